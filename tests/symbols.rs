//! The default guest's real System.map (from Debian's `-dbg` package) parses, and the symbols
//! the probe work relies on resolve to text.

use probe_core::symbols::SymbolMap;

#[test]
fn the_default_guests_system_map_resolves_syscall_entry_points() {
    let guest = hvprobe_guest::default_guest().expect("default guest builds");
    let text = std::fs::read_to_string(guest.kernel.system_map()).unwrap();
    let map = SymbolMap::parse(&text).unwrap();
    assert!(
        map.len() > 50_000,
        "a real kernel has many symbols: {}",
        map.len()
    );
    let text_start = map.lookup("_text").unwrap().addr;
    assert_eq!(text_start, 0xffff_ffff_8100_0000, "nokaslr link address");
    // Addresses are named as the kernel's kallsyms names them: getpid's three aliases by the
    // first of them (the guest's ftrace prints `(__do_sys_getpid+0x0/0x30)` for a kprobe on
    // `__x64_sys_getpid`).
    for (name, named) in [
        ("__x64_sys_getpid", "__do_sys_getpid"),
        ("do_sys_openat2", "do_sys_openat2"),
        ("ksys_read", "ksys_read"),
    ] {
        let sym = map.lookup(name).unwrap();
        assert!(sym.is_text(), "{name} is text");
        assert!(sym.addr > text_start);
        let size = map.size_of(sym).unwrap();
        assert!(size > 0 && size < 0x10000, "{name} size {size:#x}");
        assert_eq!(map.describe(sym.addr + 1), format!("{named}+0x1"));
    }
    assert!(map.resolve("no_such_kernel_function").is_err());
}

#[test]
fn the_guest_kernels_btf_gives_task_struct_offsets() {
    let guest = hvprobe_guest::default_guest().expect("default guest");
    let vmlinux = std::fs::read(guest.kernel.vmlinux()).unwrap();
    let btf =
        probe_core::btf::Btf::parse(probe_core::elf::section(&vmlinux, ".BTF").unwrap()).unwrap();
    let pid = btf.member_offset("task_struct", "pid").unwrap();
    let tgid = btf.member_offset("task_struct", "tgid").unwrap();
    let comm = btf.member_offset("task_struct", "comm").unwrap();
    // pid_t pid; pid_t tgid; are adjacent in every kernel; comm is a 16-byte array further on.
    assert_eq!(tgid, pid + 4);
    assert!(comm > tgid && comm < 8192, "comm at {comm}");
}

#[test]
fn the_x86_guest_kernels_orc_tables_give_a_call_frame_at_each_function_entry() {
    use probe_core::unwind::orc::{OrcLayout, OrcReg, OrcTable, OrcType};
    let guest = hvprobe_guest::default_guest_for(hvprobe_guest::GuestArch::X86_64)
        .expect("default x86_64 guest");
    let vmlinux = std::fs::read(guest.kernel.vmlinux()).unwrap();
    let map =
        SymbolMap::parse(&std::fs::read_to_string(guest.kernel.system_map()).unwrap()).unwrap();
    let ip_va = map.lookup("__start_orc_unwind_ip").unwrap().addr;
    let table = OrcTable::parse(
        probe_core::elf::section(&vmlinux, ".orc_unwind_ip").unwrap(),
        ip_va,
        probe_core::elf::section(&vmlinux, ".orc_unwind").unwrap(),
        OrcLayout::for_release(6, 1).unwrap(),
    )
    .unwrap();
    assert!(table.len() > 100_000, "{} entries", table.len());
    // At a C function's first instruction the return address is at %rsp: CFA = %rsp + 8.
    for name in [
        "__x64_sys_getpid",
        "vfs_read",
        "do_sys_openat2",
        "ksys_read",
    ] {
        let e = table.lookup(map.lookup(name).unwrap().addr).unwrap();
        assert_eq!(
            (e.kind, e.sp_reg, e.sp_offset, e.end),
            (OrcType::Call, OrcReg::Sp, 8, false),
            "{name}: {e:?}"
        );
    }
    // The syscall entry is a stack's last frame, a full pt_regs one once it has built it.
    let entry = map.lookup("entry_SYSCALL_64").unwrap().addr;
    assert!(
        (0..0x100).any(|off| table.lookup(entry + off).is_some_and(|e| e.end)),
        "no end-of-stack rule in entry_SYSCALL_64"
    );
}
