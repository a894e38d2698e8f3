//! The engine on the aarch64 back end, through its fake machine: a BRK planted and removed
//! byte for byte, an emulated hit, refusals that leave the text untouched, the guest's own
//! BRK handed back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::aarch64::{Aarch64, PROBE_BRK_IMM, PSTATE_DAIF, SLOT_BRK_IMM, brk};
use crate::engine::{PlantErrorKind, PlantTarget, ProbeEngine, VcpuProbeState};
use crate::fake::aarch64::*;
use crate::probe::Probe;
use crate::vm::{DebugEvent, Verdict};

fn target(off: u64) -> PlantTarget {
    PlantTarget {
        va: TEXT_VA + off,
        function_start: Some(TEXT_VA),
    }
}

fn text(engine: &ProbeEngine<Aarch64, GuestMemoryMmap>) -> Vec<u8> {
    let mut b = vec![0u8; CODE.len() * 4];
    engine
        .memory()
        .read_slice(&mut b, GuestAddress(TEXT_GPA))
        .unwrap();
    b
}

fn word_at(engine: &ProbeEngine<Aarch64, GuestMemoryMmap>, off: u64) -> u32 {
    engine
        .memory()
        .read_obj(GuestAddress(TEXT_GPA + off))
        .unwrap()
}

#[test]
fn a_brk_is_planted_hit_emulated_and_removed_byte_for_byte() {
    let (engine, mut vcpu) = machine();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let probe = Probe::<Aarch64>::new("f+0x4").on_hit(move |ctx| {
        s.store(ctx.regs.x[29], Ordering::SeqCst);
        Ok(())
    });
    let regs = vcpu.regs.clone();
    let id = engine.plant(probe, target(AT_NOP), &regs).unwrap();
    assert_eq!(word_at(&engine, AT_NOP), brk(PROBE_BRK_IMM));
    // The BRK was made visible to instruction fetch (the spy: the engine's count of syncs).
    assert_eq!(engine.instruction_syncs(), 1);

    vcpu.regs.pc = TEXT_VA + AT_NOP;
    // A pending branch type (as after a `br` to a BTI pad) is cleared when the host moves PC.
    vcpu.regs.pstate |= 1 << 10;
    let mut state = VcpuProbeState::default();
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint {
                pc: TEXT_VA + AT_NOP,
            },
        )
        .unwrap();
    assert_eq!(v, Verdict::Resume);
    assert_eq!(seen.load(Ordering::SeqCst), 0xf0f0);
    assert_eq!(vcpu.regs.pc, TEXT_VA + AT_NOP + 4);
    assert_eq!(vcpu.regs.pstate & (3 << 10), 0);
    let stats = engine.stats();
    assert_eq!(
        (stats[0].hits, stats[0].plan, stats[0].instruction.as_str()),
        (1, crate::arch::PlanKind::Emulate, "nop")
    );

    assert_eq!(engine.remove(id).unwrap(), None);
    assert_eq!(text(&engine), code_bytes());
    assert_eq!(engine.instruction_syncs(), 2, "the restored word too");
}

#[test]
fn refusals_name_the_instruction_and_leave_the_text_untouched() {
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    // A load-exclusive: refused, named.
    let err = engine
        .plant(Probe::new("f+0x14"), target(AT_LDXR), &regs)
        .unwrap_err();
    assert!(matches!(err.kind, PlantErrorKind::Refused { .. }), "{err}");
    assert!(err.to_string().contains("ldxr x0, [x1]"), "{err}");
    // Off an instruction boundary.
    let err = engine
        .plant(Probe::new("f+0x6"), target(6), &regs)
        .unwrap_err();
    assert!(
        err.to_string().contains("not on an instruction boundary"),
        "{err}"
    );
    // A return probe away from a function's entry.
    let err = engine
        .plant(
            Probe::new("f+0x4").on_return(|_| Ok(())),
            target(AT_NOP),
            &regs,
        )
        .unwrap_err();
    assert!(err.to_string().contains("first instruction"), "{err}");
    assert_eq!(text(&engine), code_bytes());
    assert!(engine.is_empty());
    assert_eq!(engine.instruction_syncs(), 0, "nothing written");
}

#[test]
fn the_prologue_store_pair_is_emulated_through_the_guest_page_tables() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let id = engine
        .plant(Probe::new("f+0x8"), target(AT_STP), &regs)
        .unwrap();
    vcpu.regs.pc = TEXT_VA + AT_STP;
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut VcpuProbeState::default(),
            DebugEvent::Breakpoint {
                pc: TEXT_VA + AT_STP,
            },
        )
        .unwrap();
    assert_eq!(v, Verdict::Resume);
    assert_eq!(vcpu.full_reads, 1, "x29 and x30 read to be stored");
    assert_eq!(vcpu.regs.sp, STACK_VA + 0x7f0);
    assert_eq!(vcpu.regs.pc, TEXT_VA + AT_STP + 4);
    let fp: u64 = engine
        .memory()
        .read_obj(GuestAddress(STACK_GPA + 0x7f0))
        .unwrap();
    let lr: u64 = engine
        .memory()
        .read_obj(GuestAddress(STACK_GPA + 0x7f8))
        .unwrap();
    assert_eq!((fp, lr), (0xf0f0, TEXT_VA + 0x100));
    engine.remove(id).unwrap();
    assert_eq!(text(&engine), code_bytes());
}

#[test]
fn an_emulated_store_that_faults_disarms_the_site_instead_of_trapping_forever() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::new("f+0x8"), target(AT_STP), &regs)
        .unwrap();
    // The stack pointer is on an unmapped page: the emulated stp cannot write.
    vcpu.regs.sp = TEXT_VA + 0x10_0000;
    vcpu.regs.pc = TEXT_VA + AT_STP;
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut VcpuProbeState::default(),
            DebugEvent::Breakpoint {
                pc: TEXT_VA + AT_STP,
            },
        )
        .unwrap();
    assert_eq!(v, Verdict::Resume);
    // The vCPU runs the guest's own stp (and takes its fault); the trap is gone.
    assert_eq!(vcpu.regs.pc, TEXT_VA + AT_STP);
    assert_eq!(text(&engine), code_bytes());
    assert_eq!(engine.stats()[0].missed, 1);
}

#[test]
fn a_hardware_breakpoint_whose_emulation_faults_is_released_and_its_site_refuses_new_probes() {
    let (engine, mut vcpu) = machine();
    engine.set_hardware_breakpoint_count(6);
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::new("f+0x8").hardware(), target(AT_STP), &regs)
        .unwrap();
    let (hw, generation) = engine.hardware_breakpoints();
    assert_eq!(hw[0], Some(TEXT_VA + AT_STP));
    vcpu.regs.sp = TEXT_VA + 0x10_0000;
    vcpu.regs.pc = TEXT_VA + AT_STP;
    let hit = DebugEvent::HardwareBreakpoint {
        pc: TEXT_VA + AT_STP,
    };
    let mut state = VcpuProbeState::default();
    assert_eq!(
        engine.handle_debug(&mut vcpu, &mut state, hit).unwrap(),
        Verdict::Resume
    );
    // The breakpoint is released (a new generation for the VMM to load), so the guest's own
    // stp runs instead of firing again forever.
    let (hw, now) = engine.hardware_breakpoints();
    assert!(hw.iter().all(Option::is_none), "{hw:?}");
    assert!(now > generation);
    assert_eq!(vcpu.regs.pc, TEXT_VA + AT_STP);
    assert_eq!(engine.stats()[0].missed, 1);
    // A probe added there is refused with the reason, rather than never firing.
    let err = engine
        .plant(Probe::new("f+0x8").hardware(), target(AT_STP), &regs)
        .unwrap_err();
    assert!(err.to_string().contains("disarmed"), "{err}");
    assert_eq!(text(&engine), code_bytes());
}

#[test]
fn a_stepped_load_runs_in_a_slot_followed_by_a_brk_with_interrupts_masked() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let id = engine
        .plant(Probe::new("f+0x10"), target(AT_LDR), &regs)
        .unwrap();
    assert_eq!(engine.stats()[0].plan, crate::arch::PlanKind::Xol);
    // The slot and the BRK in the text, each synced once written.
    assert_eq!(engine.instruction_syncs(), 2);
    vcpu.regs.pc = TEXT_VA + AT_LDR;
    let mut state = VcpuProbeState::default();
    let hit = DebugEvent::Breakpoint {
        pc: TEXT_VA + AT_LDR,
    };
    engine.handle_debug(&mut vcpu, &mut state, hit).unwrap();
    let slot = vcpu.regs.pc;
    assert!(slot >= crate::arch::aarch64::xol::XOL_VA_BASE, "{slot:#x}");
    assert_eq!(
        vcpu.regs.pstate & PSTATE_DAIF,
        PSTATE_DAIF,
        "masked for the step"
    );
    assert!(state.stepping());
    // The slot, read through the guest's own tables: the copy, then hvprobe's slot BRK.
    let mut b = [0u8; 8];
    crate::engine::read_guest_virtual::<Aarch64, _>(engine.memory(), &vcpu.regs, slot, &mut b)
        .unwrap();
    assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), CODE[4]);
    assert_eq!(
        u32::from_le_bytes(b[4..].try_into().unwrap()),
        brk(SLOT_BRK_IMM)
    );
    // The guest ran the copy and reached the slot's BRK.
    vcpu.regs.pc = slot + 4;
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: slot + 4 },
        )
        .unwrap();
    assert_eq!(vcpu.regs.pc, TEXT_VA + AT_LDR + 4);
    assert_eq!(
        vcpu.regs.pstate & PSTATE_DAIF,
        0x3c5 & PSTATE_DAIF,
        "as it was"
    );
    assert!(!state.stepping());
    assert_eq!(engine.exit_stats().slot_traps, 1);
    engine.remove(id).unwrap();
    assert_eq!(text(&engine), code_bytes());
}

#[test]
fn a_return_probe_swaps_the_link_register_and_returns_through_the_trampoline() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    engine
        .plant(
            Probe::<Aarch64>::new("f").on_return(move |ctx| {
                s.store(ctx.regs.x[0], Ordering::SeqCst);
                Ok(())
            }),
            target(0),
            &regs,
        )
        .unwrap();
    let caller = vcpu.regs.x[30];
    vcpu.regs.pc = TEXT_VA;
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: TEXT_VA },
        )
        .unwrap();
    let trampoline = vcpu.regs.x[30];
    assert!(trampoline >= crate::arch::aarch64::xol::XOL_VA_BASE);
    assert_eq!(vcpu.regs.pc, TEXT_VA + 4, "bti c emulated");
    // The function returns (`ret` to x30) with x0 = 42 and its entry stack pointer.
    vcpu.regs.x[0] = 42;
    vcpu.regs.pc = trampoline;
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: trampoline },
        )
        .unwrap();
    assert_eq!(vcpu.regs.pc, caller);
    // x30 holds the real return address too, as if the function had returned to it.
    assert_eq!(vcpu.regs.x[30], caller);
    assert_eq!(seen.load(Ordering::SeqCst), 42);
    let st = &engine.stats()[0];
    assert_eq!((st.hits, st.returns, st.nmissed), (1, 1, 0));
    assert_eq!(engine.live_returns(), 0);
}

#[test]
fn with_pointer_authentication_a_return_probe_needs_a_known_function_entry() {
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    // An address whose function is unknown: on a CPU that may sign x30 (the default until the
    // VMM says otherwise), the trampoline could be put in after `paciasp` signed the real
    // return address; refused, nothing written.
    let bare = PlantTarget {
        va: TEXT_VA,
        function_start: None,
    };
    let err = engine
        .plant(Probe::new("0x0").on_return(|_| Ok(())), bare, &regs)
        .unwrap_err();
    assert!(
        matches!(err.kind, PlantErrorKind::ReturnProbeRefused { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pointer authentication"), "{err}");
    assert_eq!(text(&engine), code_bytes());
    assert_eq!(engine.instruction_syncs(), 0, "nothing written");
    // A known entry is fine with it, and an unknown one once the CPU is known not to sign.
    let id = engine
        .plant(Probe::new("f").on_return(|_| Ok(())), target(0), &regs)
        .unwrap();
    engine.remove(id).unwrap();
    engine.set_cpu_features(crate::arch::aarch64::CpuFeatures::WITHOUT_PAC);
    engine
        .plant(Probe::new("0x0").on_return(|_| Ok(())), bare, &regs)
        .unwrap();
}

#[test]
fn the_general_purpose_registers_are_read_only_when_something_uses_them() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    // Without handlers: `bti c` (emulated, touches no general-purpose register) and the
    // stepped `ldr` (both of its exits) run on the control registers alone; the fake vCPU
    // refuses a write of a general-purpose register the engine did not read. (The prologue's
    // `stp` needs them: see the store-pair test.)
    engine.plant(Probe::new("f"), target(0), &regs).unwrap();
    engine
        .plant(Probe::new("f+0x10"), target(AT_LDR), &regs)
        .unwrap();
    let mut state = VcpuProbeState::default();
    let mut exit = |vcpu: &mut crate::fake::FakeVcpu<Aarch64>, pc: u64| {
        vcpu.regs.pc = pc;
        engine
            .handle_debug(vcpu, &mut state, DebugEvent::Breakpoint { pc })
            .unwrap();
        vcpu.regs.pc
    };
    assert_eq!(exit(&mut vcpu, TEXT_VA), TEXT_VA + 4);
    let slot = exit(&mut vcpu, TEXT_VA + AT_LDR);
    assert_eq!(exit(&mut vcpu, slot + 4), TEXT_VA + AT_LDR + 4);
    assert_eq!(vcpu.full_reads, 0, "three exits on the control registers");
    assert_eq!(vcpu.regs.x[29], 0xf0f0, "nothing written over them");
}

#[test]
fn a_probe_reached_through_an_alias_of_its_page_is_disarmed_not_handed_to_the_guest() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::new("f+0x4"), target(AT_NOP), &regs)
        .unwrap();
    // The text page mapped a second time four pages on (as the identity map or a trampoline's
    // alias maps kernel text), and the guest runs the BRK there.
    let idx = |level: u32| (TEXT_VA >> (39 - 9 * level)) & 0x1ff;
    engine
        .memory()
        .write_obj(
            TEXT_GPA | (1 << 7) | (1 << 10) | 3,
            GuestAddress(0x4000 + (idx(3) + 4) * 8),
        )
        .unwrap();
    let alias = TEXT_VA + 4 * 0x1000 + AT_NOP;
    vcpu.regs.pc = alias;
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut VcpuProbeState::default(),
            DebugEvent::Breakpoint { pc: alias },
        )
        .unwrap();
    assert_eq!(v, Verdict::Resume, "never handed back to the guest");
    assert_eq!(
        vcpu.regs.pc, alias,
        "the guest's own instruction runs there"
    );
    assert_eq!(text(&engine), code_bytes(), "the BRK is gone");
    assert_eq!(engine.stats()[0].missed, 1);
    let err = engine
        .plant(Probe::new("f+0x4"), target(AT_NOP), &regs)
        .unwrap_err();
    assert!(err.to_string().contains("another address"), "{err}");
}

#[test]
fn a_site_past_its_rate_cap_is_paused_for_its_window_and_armed_again() {
    let (engine, mut vcpu) = machine();
    engine.set_rate_cap(Some(3));
    let regs = vcpu.regs.clone();
    let id = engine
        .plant(Probe::new("f+0x4"), target(AT_NOP), &regs)
        .unwrap();
    let pc = TEXT_VA + AT_NOP;
    let mut state = VcpuProbeState::default();
    let mut hit = |vcpu: &mut crate::fake::FakeVcpu<Aarch64>| {
        vcpu.regs.pc = pc;
        engine
            .handle_debug(vcpu, &mut state, DebugEvent::Breakpoint { pc })
            .unwrap();
        vcpu.regs.pc
    };
    for _ in 0..3 {
        assert_eq!(hit(&mut vcpu), pc + 4, "the nop emulated");
    }
    // The fourth in the window: missed, the guest's nop back under the site, the vCPU on it.
    assert_eq!(hit(&mut vcpu), pc);
    assert_eq!(text(&engine), code_bytes());
    assert_eq!(engine.paused_sites(), 1);
    // A vCPU that took the BRK as it went: missed too, nothing written.
    assert_eq!(hit(&mut vcpu), pc);
    let s = &engine.stats()[0];
    assert_eq!((s.hits, s.missed), (3, 2));
    assert_eq!(engine.exit_stats().rate_capped, 2);
    // Within the window nothing is re-armed; after it, the BRK is back and hits count again.
    assert_eq!(engine.resume_paused_sites(), 0);
    let due = engine.next_paused_site_due().expect("a paused site is due");
    assert!(due <= std::time::Duration::from_millis(1000), "{due:?}");
    std::thread::sleep(due + std::time::Duration::from_millis(5));
    assert_eq!(engine.resume_paused_sites(), 1);
    assert_eq!(engine.next_paused_site_due(), None);
    assert_eq!(word_at(&engine, AT_NOP), brk(PROBE_BRK_IMM));
    assert_eq!(hit(&mut vcpu), pc + 4);
    assert_eq!(engine.stats()[0].hits, 4);
    // Removal restores the text byte for byte, paused or not.
    engine.remove(id).unwrap();
    assert_eq!(text(&engine), code_bytes());
}

#[test]
fn a_copy_of_an_hvprobe_brk_where_none_was_planted_is_never_handed_to_the_guest() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::new("f+0x4"), target(AT_NOP), &regs)
        .unwrap();
    // The guest copies the probed word (hvprobe's BRK) elsewhere in its text and runs it.
    let copy = TEXT_GPA + 0x20;
    engine
        .memory()
        .write_obj(brk(PROBE_BRK_IMM), GuestAddress(copy))
        .unwrap();
    let pc = TEXT_VA + 0x20;
    vcpu.regs.pc = pc;
    let err = engine
        .handle_debug(
            &mut vcpu,
            &mut VcpuProbeState::default(),
            DebugEvent::Breakpoint { pc },
        )
        .unwrap_err();
    assert!(
        matches!(err, crate::vm::VcpuError::StrayBreakpoint { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not handed to the guest"), "{err}");
    // The guest's own BRK there would go back.
    engine
        .memory()
        .write_obj(brk(0x800), GuestAddress(copy))
        .unwrap();
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut VcpuProbeState::default(),
            DebugEvent::Breakpoint { pc },
        )
        .unwrap();
    assert_eq!(v, Verdict::Reinject);
}

#[test]
fn a_user_access_is_probed_only_where_a_fault_of_its_copy_is_rewound_to_it() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine.set_exception_table([TEXT_VA + AT_LDR]);
    let err = engine
        .plant(Probe::new("f+0x10"), target(AT_LDR), &regs)
        .unwrap_err();
    assert!(
        matches!(err.kind, PlantErrorKind::ExceptionTable { .. }),
        "{err}"
    );
    assert_eq!(text(&engine), code_bytes(), "nothing written");

    // The VMM watches the vector: the access is stepped in a trapped slot.
    engine.set_slot_exception_rewind(true);
    engine
        .plant(Probe::new("f+0x10"), target(AT_LDR), &regs)
        .unwrap();
    vcpu.regs.pc = TEXT_VA + AT_LDR;
    vcpu.regs.pstate = 0x5; // EL1h, interrupts on
    let mut state = VcpuProbeState::default();
    let hit = DebugEvent::Breakpoint {
        pc: TEXT_VA + AT_LDR,
    };
    engine.handle_debug(&mut vcpu, &mut state, hit).unwrap();
    let slot = vcpu.regs.pc;
    assert!(slot >= crate::arch::aarch64::xol::XOL_VA_BASE, "{slot:#x}");
    assert_eq!(vcpu.regs.pstate & PSTATE_DAIF, PSTATE_DAIF);
    // An exception returning anywhere but into this vCPU's copy is not the step's.
    assert_eq!(engine.rewind_slot_exception(&mut state, slot + 4), None);
    assert_eq!(
        engine.rewind_slot_exception(&mut state, TEXT_VA + AT_LDR),
        None
    );
    assert!(state.stepping());
    // The copy faulted: the exception becomes the probed instruction's, with its mask.
    let rewind = engine.rewind_slot_exception(&mut state, slot).unwrap();
    assert_eq!(rewind.resume_at, TEXT_VA + AT_LDR);
    assert_eq!(rewind.interrupts & PSTATE_DAIF, 0);
    assert!(!state.stepping(), "the step is over");
    assert_eq!(engine.rewind_slot_exception(&mut state, slot), None);
    assert_eq!(engine.exit_stats().slot_exceptions, 1);
    assert_eq!(engine.exit_stats().abandoned_steps, 0);
}

#[test]
fn watchpoints_take_registers_of_their_own_and_give_them_back() {
    use crate::definition::{WatchAccess, WatchSpec};
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine.set_watchpoint_count(4);
    let spec = WatchSpec {
        len: 8,
        access: WatchAccess::Write,
    };
    let watch = |n: u64| {
        let mut p = Probe::<Aarch64>::new(format!("var+{n}"));
        p.watch = Some(spec);
        engine.plant(p, target(0x2000 + n * 8), &regs)
    };
    // A breakpoint takes a breakpoint register, not a watchpoint's.
    engine
        .plant(Probe::new("f").hardware(), target(0), &regs)
        .unwrap();
    let ids: Vec<crate::engine::ProbeId> = (0..4).map(|n| watch(n).unwrap()).collect();
    let err = watch(4).unwrap_err();
    assert!(
        matches!(err.kind, PlantErrorKind::NoWatchpoint { count: 4 }),
        "{err}"
    );
    let slots = engine.watchpoint_slots();
    assert_eq!(slots.len(), 4);
    assert!(
        slots
            .iter()
            .all(|s| s.is_some_and(|s| s.watch == Some(spec)))
    );
    assert!(
        engine
            .hardware_slots()
            .0
            .iter()
            .flatten()
            .all(|s| s.watch.is_none()),
        "no watchpoint among the breakpoints"
    );
    for id in ids {
        engine.remove(id).unwrap();
    }
    assert!(engine.watchpoint_slots().iter().all(Option::is_none));
    assert_eq!(engine.hardware_breakpoints().0[0], Some(TEXT_VA));
}
