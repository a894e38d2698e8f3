//! Host-side costs of the probe engine: resolving a probe location against a kernel-sized
//! symbol table, symbolizing a hit address, a page walk per translation, and the engine's own
//! time per probe hit for each step plan (a fake vCPU over real guest memory, so the figure
//! excludes the VM exit itself), and the cost of a definition's fetch arguments. Run with
//! `cargo bench -p probe-core`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use probe_core::arch::aarch64::Aarch64;
use probe_core::arch::x86_64::pagewalk::{PagingMode, translate};
use probe_core::arch::x86_64::{Gpr, X86_64};
use probe_core::definition::ProbeDefinition;
use probe_core::engine::{PlantTarget, VcpuProbeState};
use probe_core::fake;
use probe_core::fake::{
    AT_CALL, AT_PUSH, AT_RIPREL, STACK_GPA, STACK_VA, TEXT_VA, context, machine,
};
use probe_core::fetch::{FetchEnv, format_args};
use probe_core::probe::Probe;
use probe_core::symbols::SymbolMap;
use probe_core::vm::DebugEvent;
use probe_core::vm::GuestPhysMemory;
use vm_memory::{Bytes, GuestAddress};

/// A synthetic System.map the size of a distribution kernel's (about 100k symbols).
fn kernel_sized_map() -> String {
    let mut text = String::new();
    for i in 0..100_000u64 {
        text.push_str(&format!(
            "{:016x} T fn_{i}\n",
            0xffff_ffff_8100_0000u64 + i * 0x40
        ));
    }
    text
}

struct Tables(HashMap<u64, u64>);

impl GuestPhysMemory for Tables {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        // Page-table entries only: aligned 8-byte reads.
        if buf.len() != 8 {
            return false;
        }
        buf.copy_from_slice(&self.0.get(&gpa).unwrap_or(&0).to_le_bytes());
        true
    }
}

fn engine(c: &mut Criterion) {
    let text = kernel_sized_map();
    c.bench_function("symbols/parse_100k", |b| {
        b.iter(|| SymbolMap::parse(black_box(&text)).unwrap())
    });
    let map = SymbolMap::parse(&text).unwrap();
    c.bench_function("symbols/resolve_name_plus_offset", |b| {
        b.iter(|| map.resolve(black_box("fn_77777+0x10")).unwrap())
    });
    c.bench_function("symbols/describe_address", |b| {
        b.iter(|| map.describe(black_box(0xffff_ffff_8100_0000 + 77_777 * 0x40 + 0x13)))
    });

    // Kernel text mapped with a 4 KiB page at the end of a full 4-level walk.
    let va = 0xffff_ffff_8100_5123u64;
    let idx = |level: u32| (va >> (12 + 9 * (level - 1))) & 0x1ff;
    let mut t = HashMap::new();
    t.insert(0x1000 + idx(4) * 8, 0x2000 | 3);
    t.insert(0x2000 + idx(3) * 8, 0x3000 | 3);
    t.insert(0x3000 + idx(2) * 8, 0x4000 | 3);
    t.insert(0x4000 + idx(1) * 8, 0x0100_5000 | 1);
    let mem = Tables(t);
    c.bench_function("pagewalk/4level_4k", |b| {
        b.iter(|| translate(&mem, 0x1000, PagingMode::FourLevel, black_box(va)).unwrap())
    });
}

/// One hit per iteration on a probe at `offset` of the fake text (a stepped plan's hit sends the
/// vCPU to its boosted slot: no second exit); registers are reset each time.
fn hit_cost(c: &mut Criterion, name: &str, offset: u64, with_handler: bool) {
    let (engine, mut vcpu) = machine();
    // The engine's own cost: the fake vCPU hands over every register at once.
    vcpu.lazy = false;
    let regs = vcpu.regs.clone();
    let mut probe = Probe::<X86_64>::new(name);
    if with_handler {
        probe = probe.on_hit(|ctx| {
            black_box(ctx.arg(0));
            Ok(())
        });
    }
    let target = PlantTarget {
        va: TEXT_VA + offset,
        function_start: Some(TEXT_VA),
    };
    engine.plant(probe, target, &regs).unwrap();
    let mut state = VcpuProbeState::default();
    let pc = TEXT_VA + offset;
    c.bench_function(name, |b| {
        b.iter(|| {
            vcpu.regs.rip = pc;
            vcpu.regs.set(Gpr::Rsp, STACK_VA + 0x800);
            engine
                .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
                .unwrap();
        })
    });
}

fn hits(c: &mut Criterion) {
    hit_cost(c, "hit/emulate_push", AT_PUSH, false);
    hit_cost(c, "hit/emulate_push_with_handler", AT_PUSH, true);
    hit_cost(c, "hit/xol_riprel_boosted", AT_RIPREL, false);
    hit_cost(c, "hit/emulate_indirect_call", AT_CALL, false);
    arm64_hit_cost(c, "hit/arm64_emulate_stp", fake::aarch64::AT_STP);
    arm64_hit_cost(c, "hit/arm64_xol_ldr", fake::aarch64::AT_LDR);
}

/// The engine's time for one hit of an arm64 probe: the BRK exit, and for an out-of-line plan
/// the slot's BRK exit too (arm64 has no boosted slots), through the aarch64 fake machine.
fn arm64_hit_cost(c: &mut Criterion, name: &str, offset: u64) {
    use fake::aarch64::{STACK_VA as SP, TEXT_VA as TEXT, machine};
    let (engine, mut vcpu) = machine();
    // The engine's own cost: the fake vCPU hands over every register at once.
    vcpu.lazy = false;
    let regs = vcpu.regs.clone();
    let target = PlantTarget {
        va: TEXT + offset,
        function_start: Some(TEXT),
    };
    engine
        .plant(Probe::<Aarch64>::new(name), target, &regs)
        .unwrap();
    let mut state = VcpuProbeState::default();
    let pc = TEXT + offset;
    c.bench_function(name, |b| {
        b.iter(|| {
            vcpu.regs.pc = pc;
            vcpu.regs.sp = SP + 0x800;
            engine
                .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
                .unwrap();
            if vcpu.regs.pc != pc + 4 {
                // Out of line: the guest ran the copy and reached the slot's BRK.
                let trap = vcpu.regs.pc + 4;
                vcpu.regs.pc = trap;
                engine
                    .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc: trap })
                    .unwrap();
            }
        })
    });
}

/// The handler-side cost of a definition's fetch arguments: three numbers (a register, two
/// reads through a pointer) and a string, formatted into the event line's argument part, against
/// a definition with none. Guest memory reads go through the page walk, as at a real hit.
fn fetch_cost(c: &mut Criterion) {
    let (engine, mut vcpu) = machine();
    let mem = engine.memory();
    vcpu.regs.set(Gpr::Rdi, (-100i64) as u64);
    vcpu.regs.set(Gpr::Rsi, STACK_VA + 0x200);
    vcpu.regs.set(Gpr::Rdx, STACK_VA + 0x100);
    mem.write_obj(0x8241u64, GuestAddress(STACK_GPA + 0x100))
        .unwrap();
    mem.write_obj(0x1b6u64, GuestAddress(STACK_GPA + 0x108))
        .unwrap();
    mem.write_slice(b"/etc/passwd\0", GuestAddress(STACK_GPA + 0x200))
        .unwrap();
    let ctx = context(mem, &vcpu.regs);
    for (name, text) in [
        ("fetch/bare", "p:hv/open f"),
        (
            "fetch/3_args_and_a_string",
            "p:hv/open f dfd=$arg1:s32 flags=+0($arg3):x64 mode=+8($arg3):x64 name=+0($arg2):string",
        ),
    ] {
        let def = ProbeDefinition::parse(text).unwrap();
        c.bench_function(name, |b| {
            b.iter(|| format_args(&ctx, black_box(&def.args), FetchEnv::default()))
        });
    }
}

criterion_group!(benches, engine, hits, fetch_cost);
criterion_main!(benches);
