//! Engine tests: a fake vCPU over real `GuestMemoryMmap` memory with hand-made page tables.
//! The contract every architecture keeps is `conformance.rs`, run on each architecture's fake
//! machine; this file holds what is x86_64's own, `aarch64.rs` what is arm64's.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::xol::XOL_VA_BASE;
use crate::arch::x86_64::{Decoder, Gpr, INT3, Registers, X86_64};
use crate::fake::*;

use super::*;

type Engine = ProbeEngine<X86_64, GuestMemoryMmap>;
const SLOT_SIZE: u64 = crate::arch::x86_64::xol::LAYOUT.slot_size;

mod aarch64;
mod conformance;
mod jump;

fn target(off: u64) -> PlantTarget {
    PlantTarget {
        va: TEXT_VA + off,
        function_start: Some(TEXT_VA),
    }
}

fn text(engine: &Engine) -> Vec<u8> {
    let mut b = vec![0u8; CODE.len()];
    engine
        .memory()
        .read_slice(&mut b, GuestAddress(TEXT_GPA))
        .unwrap();
    b
}

#[test]
fn an_emulated_hit_runs_the_handler_and_costs_one_exit() {
    let (engine, mut vcpu) = machine();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let probe = Probe::<X86_64>::new("f+0x4").on_hit(move |ctx| {
        s.store(ctx.regs.get(Gpr::Rbp), Ordering::SeqCst);
        assert_eq!(ctx.read_u64(ctx.regs.get(Gpr::Rsp))?, 0);
        Ok(())
    });
    let regs = vcpu.regs.clone();
    let id = engine.plant(probe, target(AT_PUSH), &regs).unwrap();
    assert_eq!(text(&engine)[AT_PUSH as usize], INT3);

    vcpu.regs.rip = TEXT_VA + AT_PUSH;
    let mut state = VcpuProbeState::default();
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint {
                pc: TEXT_VA + AT_PUSH,
            },
        )
        .unwrap();
    assert_eq!(v, Verdict::Resume);
    assert_eq!(seen.load(Ordering::SeqCst), 0xb0b0);
    // push %rbp was emulated: rsp moved, rbp is on the stack, rip is past the push.
    assert_eq!(vcpu.regs.rip, TEXT_VA + AT_PUSH + 1);
    assert_eq!(vcpu.regs.get(Gpr::Rsp), STACK_VA + 0x7f8);
    let pushed: u64 = engine
        .memory()
        .read_obj(GuestAddress(STACK_GPA + 0x7f8))
        .unwrap();
    assert_eq!(pushed, 0xb0b0);
    assert!(!state.stepping());
    let stats = engine.stats();
    assert_eq!((stats[0].hits, stats[0].plan), (1, PlanKind::Emulate));

    assert_eq!(engine.remove(id).unwrap(), None);
    assert_eq!(text(&engine), CODE);
}

/// Reads a slot's bytes through the guest's page tables.
fn slot_bytes(engine: &Engine, regs: &Registers, va: u64) -> Vec<u8> {
    let mut b = vec![0u8; SLOT_SIZE as usize];
    read_guest_virtual::<X86_64, _>(engine.memory(), regs, va, &mut b).unwrap();
    b
}

#[test]
fn a_rip_relative_instruction_runs_boosted_with_its_operand_made_absolute() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap();
    let pc = TEXT_VA + AT_RIPREL;
    vcpu.regs.rip = pc;
    let mut state = VcpuProbeState::default();
    let before = vcpu.regs.clone();
    engine
        .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
        .unwrap();
    assert!(!state.stepping(), "a boosted step leaves no state behind");
    let slot = vcpu.regs.rip;
    assert!(slot >= XOL_VA_BASE);
    assert_eq!(
        Registers {
            rip: pc,
            ..vcpu.regs.clone()
        },
        before,
        "only RIP moved"
    );
    // The slot holds `mov disp(%rip),%rax` made absolute (the target is in the kernel image,
    // within a sign-extended disp32), addressing the same byte as the original, then `jmp`
    // back to the next original instruction.
    let bytes = slot_bytes(&engine, &vcpu.regs, slot);
    let d = Decoder::new().unwrap();
    let copy = d.decode(&bytes, slot).unwrap();
    assert_eq!(copy.len(), 8);
    assert_eq!(
        copy.text,
        format!("mov rax, qword ptr [{:#x}]", pc + 7 + 0x100)
    );
    let jmp = d.decode(&bytes[8..], slot + 8).unwrap();
    assert_eq!(jmp.text, format!("jmp {:#x}", pc + 7));
    let e = engine.exit_stats();
    assert_eq!((e.breakpoints, e.slot_traps), (1, 0));
    assert_eq!(engine.stats()[0].plan, PlanKind::XolRiprel);
}

#[test]
fn an_indirect_call_through_a_register_is_emulated() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::<X86_64>::new("f+0xf"), target(AT_CALL), &regs)
        .unwrap();
    let pc = TEXT_VA + AT_CALL;
    vcpu.regs.rip = pc;
    vcpu.regs.set(Gpr::Rax, 0xffff_ffff_8100_0100);
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
        .unwrap();
    assert_eq!(vcpu.regs.rip, 0xffff_ffff_8100_0100, "the branch is taken");
    let ret: u64 = engine
        .memory()
        .read_obj(GuestAddress(STACK_GPA + 0x7f8))
        .unwrap();
    assert_eq!(ret, pc + 2, "the return address is in the original stream");
    assert_eq!(engine.stats()[0].plan, PlanKind::Emulate);
}

#[test]
fn a_failing_stack_push_falls_back_to_the_real_instruction_in_a_boosted_slot() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::<X86_64>::new("f+0x4"), target(AT_PUSH), &regs)
        .unwrap();
    let pc = TEXT_VA + AT_PUSH;
    vcpu.regs.rip = pc;
    // A stack pointer into an unmapped page (a guard page).
    vcpu.regs.set(Gpr::Rsp, STACK_VA + 0x10_0000);
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
        .unwrap();
    let slot = vcpu.regs.rip;
    assert!(slot >= XOL_VA_BASE, "not retried in place: {slot:#x}");
    assert_eq!(vcpu.regs.get(Gpr::Rsp), STACK_VA + 0x10_0000);
    let bytes = slot_bytes(&engine, &vcpu.regs, slot);
    let d = Decoder::new().unwrap();
    assert_eq!(d.decode(&bytes, slot).unwrap().text, "push rbp");
    assert_eq!(
        d.decode(&bytes[1..], slot + 1).unwrap().text,
        format!("jmp {:#x}", pc + 1)
    );
    assert_eq!(engine.exit_stats().emulation_fallbacks, 1);
}

#[test]
fn foreign_traps_go_back_and_failing_handlers_are_counted() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let mut state = VcpuProbeState::default();
    // Not ours: the guest's own int3 at the ret, no probe there.
    let own = TEXT_VA + CODE.len() as u64 - 1;
    engine
        .memory()
        .write_obj(INT3, GuestAddress(TEXT_GPA + CODE.len() as u64 - 1))
        .unwrap();
    vcpu.regs.rip = own;
    let before = vcpu.regs.clone();
    assert_eq!(
        engine
            .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc: own })
            .unwrap(),
        Verdict::Reinject
    );
    assert_eq!(vcpu.regs, before);
    assert_eq!(engine.exit_stats().reinjected, 1);
    engine
        .memory()
        .write_obj(0xc3u8, GuestAddress(TEXT_GPA + CODE.len() as u64 - 1))
        .unwrap();
    vcpu.regs.rip = TEXT_VA;

    // Two probes on one address share the breakpoint; one errs, one panics.
    engine
        .plant(
            Probe::<X86_64>::new("a").on_hit(|_| Err("no".into())),
            target(0),
            &regs,
        )
        .unwrap();
    engine
        .plant(
            Probe::<X86_64>::new("b").on_hit(|_| panic!("handler bug")),
            target(0),
            &regs,
        )
        .unwrap();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let v = engine.handle_debug(
        &mut vcpu,
        &mut state,
        DebugEvent::Breakpoint { pc: TEXT_VA },
    );
    std::panic::set_hook(hook);
    assert_eq!(v.unwrap(), Verdict::Resume);
    assert_eq!(
        vcpu.regs.rip,
        TEXT_VA + 4,
        "endbr64 emulated, guest goes on"
    );
    let stats = engine.stats();
    assert_eq!(stats.len(), 2);
    assert!(stats.iter().all(|s| s.hits == 1 && s.handler_errors == 1));
    assert_eq!(engine.remove_all(), vec![]);
    assert_eq!(text(&engine), CODE);
}

#[test]
fn bad_locations_change_nothing() {
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    // ud2 past the function: refused by name.
    let ud2 = TEXT_VA + 0x40;
    engine
        .memory()
        .write_slice(&[0x0f, 0x0b], GuestAddress(TEXT_GPA + 0x40))
        .unwrap();
    let err = engine
        .plant(
            Probe::<X86_64>::new("ud2"),
            PlantTarget {
                va: ud2,
                function_start: None,
            },
            &regs,
        )
        .unwrap_err();
    assert!(err.to_string().contains("ud2"), "{err}");
    // An instruction the guest's exception table lists.
    engine.set_exception_table([TEXT_VA + AT_RIPREL]);
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap_err();
    assert!(err.to_string().contains("exception table"), "{err}");
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x6"), target(6), &regs)
        .unwrap_err();
    assert!(
        err.to_string().contains("not on an instruction boundary"),
        "{err}"
    );
    let err = engine
        .plant(
            Probe::<X86_64>::new("0xffffffff82000000"),
            PlantTarget {
                va: 0xffff_ffff_8200_0000,
                function_start: None,
            },
            &regs,
        )
        .unwrap_err();
    assert!(err.to_string().contains("not mapped"), "{err}");
    assert_eq!(text(&engine), CODE);
    assert!(engine.is_empty());
}

#[test]
fn boundaries_are_checked_against_the_original_bytes_not_our_traps() {
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::<X86_64>::new("f"), target(0), &regs)
        .unwrap();
    engine
        .plant(Probe::<X86_64>::new("f+0x4"), target(AT_PUSH), &regs)
        .unwrap();
    engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap();
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x9"), target(9), &regs)
        .unwrap_err();
    assert!(
        err.to_string().contains("inside the instruction at +0x8"),
        "{err}"
    );
    assert_eq!(engine.stats().len(), 3);
    assert_eq!(engine.remove_all(), vec![]);
    assert_eq!(text(&engine), CODE);
}

#[test]
fn a_trap_the_guest_rewrote_is_reported_not_restored() {
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    let id = engine
        .plant(Probe::<X86_64>::new("f"), target(0), &regs)
        .unwrap();
    engine
        .memory()
        .write_obj(0x90u8, GuestAddress(TEXT_GPA))
        .unwrap();
    let r = engine.remove(id).unwrap().unwrap();
    assert_eq!((r.va, r.found), (TEXT_VA, vec![0x90]));
    assert_eq!(text(&engine)[0], 0x90);
}

#[test]
fn hardware_probes_leave_text_alone_and_are_limited_to_four() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let g0 = engine.hardware_generation();
    for off in [0, AT_PUSH, 5, AT_RIPREL] {
        engine
            .plant(
                Probe::<X86_64>::new(format!("f+{off}")).hardware(),
                target(off),
                &regs,
            )
            .unwrap();
    }
    assert_eq!(text(&engine), CODE);
    assert!(engine.hardware_generation() > g0);
    assert_eq!(engine.hardware_breakpoints().0[1], Some(TEXT_VA + AT_PUSH));
    let err = engine
        .plant(
            Probe::<X86_64>::new("f+0xf").hardware(),
            target(AT_CALL),
            &regs,
        )
        .unwrap_err();
    assert!(matches!(
        err.kind,
        PlantErrorKind::NoHardwareBreakpoint { .. }
    ));
    vcpu.regs.rip = TEXT_VA;
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::HardwareBreakpoint { pc: TEXT_VA },
        )
        .unwrap();
    // One exit: endbr64, push and mov are emulated in a row, each probe's handlers run, and
    // the RIP-relative mov at +8 is set up to step in its slot.
    assert!(vcpu.regs.rip >= XOL_VA_BASE, "{:#x}", vcpu.regs.rip);
    assert!(!state.stepping(), "boosted");
    assert_eq!(vcpu.regs.get(Gpr::Rsp), STACK_VA + 0x7f8, "push emulated");
    assert!(engine.stats().iter().all(|s| s.hits == 1));
    assert_eq!(engine.exit_stats().hw_breakpoints, 1);
}

#[test]
fn one_exit_follows_emulated_instructions_into_the_next_probe() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::<X86_64>::new("f"), target(0), &regs)
        .unwrap();
    engine
        .plant(Probe::<X86_64>::new("f+0x4"), target(AT_PUSH), &regs)
        .unwrap();
    vcpu.regs.rip = TEXT_VA;
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: TEXT_VA },
        )
        .unwrap();
    // Past both: the next instruction (mov %rsp,%rbp) has no probe, so the chain stops there.
    assert_eq!(vcpu.regs.rip, TEXT_VA + AT_PUSH + 1);
    assert!(engine.stats().iter().all(|s| s.hits == 1));
    let e = engine.exit_stats();
    assert_eq!((e.breakpoints, e.hits_by_plan[0].1), (1, 2));
}

#[test]
fn a_site_that_cannot_step_is_disarmed_instead_of_trapping_forever() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap();
    // The guest puts its own mapping in the hole the XOL area uses (PUD 509 of the kernel's
    // shared PUD table at 0x2000).
    engine
        .memory()
        .write_obj(0x7777_7007u64, GuestAddress(0x2000 + 509 * 8))
        .unwrap();
    let pc = TEXT_VA + AT_RIPREL;
    vcpu.regs.rip = pc;
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
        .unwrap();
    assert_eq!(vcpu.regs.rip, pc, "the original instruction runs next");
    assert!(!state.stepping());
    assert_eq!(text(&engine), CODE, "the trap is gone");
    assert_eq!(engine.stats()[0].missed, 1);
    // A probe added there now would never fire: refused with the reason, text untouched.
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap_err();
    assert!(
        matches!(err.kind, PlantErrorKind::DisarmedSite { .. })
            && err.to_string().contains("slots"),
        "{err}"
    );
    assert_eq!(text(&engine), CODE);
    assert_eq!(
        engine.remove_all(),
        vec![],
        "not reported as a guest rewrite"
    );
    assert_eq!(text(&engine), CODE);
}

#[test]
fn five_level_guests_get_their_slots_through_pml5_entry_511() {
    let (engine, vcpu) = machine();
    let mut regs = vcpu.regs.clone();
    // A PML5 whose entry 511 points at the 4-level table maps the same text.
    engine
        .memory()
        .write_obj(CR3 | 3, GuestAddress(0x5000 + 511 * 8))
        .unwrap();
    regs.cr3 = 0x5000;
    regs.cr4 |= 1 << 12;
    engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap();
    let mut vcpu = FakeVcpu::<X86_64>::new(regs);
    let pc = TEXT_VA + AT_RIPREL;
    vcpu.regs.rip = pc;
    engine
        .handle_debug(
            &mut vcpu,
            &mut VcpuProbeState::default(),
            DebugEvent::Breakpoint { pc },
        )
        .unwrap();
    let slot = vcpu.regs.rip;
    assert!(slot >= XOL_VA_BASE);
    let bytes = slot_bytes(&engine, &vcpu.regs, slot);
    assert_eq!(bytes[..2], CODE[AT_RIPREL as usize..AT_RIPREL as usize + 2]);
}

#[test]
fn post_handlers_see_the_state_after_the_instruction() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let after_push = Arc::new(AtomicU64::new(0));
    let after_step = Arc::new(AtomicU64::new(0));
    let (a, b) = (after_push.clone(), after_step.clone());
    engine
        .plant(
            Probe::<X86_64>::new("f+0x4").after(move |ctx| {
                a.store(ctx.regs.get(Gpr::Rsp), Ordering::SeqCst);
                Ok(())
            }),
            target(AT_PUSH),
            &regs,
        )
        .unwrap();
    engine
        .plant(
            Probe::<X86_64>::new("f+0x8").after(move |ctx| {
                b.store(ctx.regs.rip, Ordering::SeqCst);
                Ok(())
            }),
            target(AT_RIPREL),
            &regs,
        )
        .unwrap();
    let mut state = VcpuProbeState::default();
    let pc = TEXT_VA + AT_PUSH;
    vcpu.regs.rip = pc;
    engine
        .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
        .unwrap();
    assert_eq!(after_push.load(Ordering::SeqCst), STACK_VA + 0x7f8);

    let pc = TEXT_VA + AT_RIPREL;
    vcpu.regs.rip = pc;
    vcpu.regs.rflags |= 1 << 9;
    engine
        .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
        .unwrap();
    assert_eq!(after_step.load(Ordering::SeqCst), 0, "not before the step");
    // The trapped slot runs with interrupts off; its int3 follows the copy.
    let slot = vcpu.regs.rip;
    assert!(state.stepping());
    assert_eq!(
        vcpu.regs.rflags & (1 << 9),
        0,
        "IF off during the trapped step"
    );
    let bytes = slot_bytes(&engine, &vcpu.regs, slot);
    assert_eq!(bytes[8], INT3, "after the 8-byte absolute copy");
    // The CPU ran the copy and reaches the int3; an unrelated vCPU state is untouched.
    vcpu.regs.set(Gpr::Rax, 0x1234);
    vcpu.regs.rip = slot + 8;
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: slot + 8 },
        )
        .unwrap();
    assert_eq!(after_step.load(Ordering::SeqCst), pc + 7);
    assert_eq!(vcpu.regs.rip, pc + 7);
    assert_eq!(vcpu.regs.get(Gpr::Rax), 0x1234);
    assert!(!state.stepping());
    assert_eq!(vcpu.regs.rflags & (1 << 9), 1 << 9, "IF back as it was");
    assert_eq!(engine.exit_stats().slot_traps, 1);
}

#[test]
fn a_trap_that_arrives_after_its_probe_was_removed_is_retried_not_reinjected() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let id = engine
        .plant(Probe::<X86_64>::new("f+0x4"), target(AT_PUSH), &regs)
        .unwrap();
    engine.remove(id).unwrap();
    let pc = TEXT_VA + AT_PUSH;
    vcpu.regs.rip = pc;
    let mut state = VcpuProbeState::default();
    let v = engine
        .handle_debug(&mut vcpu, &mut state, DebugEvent::Breakpoint { pc })
        .unwrap();
    assert_eq!(v, Verdict::Resume);
    assert_eq!(vcpu.regs.rip, pc, "the restored instruction runs");
    assert_eq!(engine.exit_stats().reinjected, 0);
}

#[test]
fn a_return_probe_sees_the_return_value_and_the_entry_registers() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    engine
        .plant(
            Probe::<X86_64>::new("f").on_return(move |ctx| {
                let entry = ctx.entry_regs.unwrap();
                s.lock()
                    .unwrap()
                    .push((ctx.regs.get(Gpr::Rax), entry.get(Gpr::Rdi), ctx.regs.rip));
                Ok(())
            }),
            target(0),
            &regs,
        )
        .unwrap();
    let err = engine
        .plant(
            Probe::<X86_64>::new("f+0x4").on_return(|_| Ok(())),
            target(AT_PUSH),
            &regs,
        )
        .unwrap_err();
    assert!(err.to_string().contains("first instruction"), "{err}");

    let caller = 0xffff_ffff_8100_0777u64;
    let sp = STACK_VA + 0x800;
    engine
        .memory()
        .write_obj(caller, GuestAddress(STACK_GPA + 0x800))
        .unwrap();
    vcpu.regs.rip = TEXT_VA;
    vcpu.regs.set(Gpr::Rdi, 42);
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: TEXT_VA },
        )
        .unwrap();
    let trampoline: u64 = engine
        .memory()
        .read_obj(GuestAddress(STACK_GPA + 0x800))
        .unwrap();
    assert!(trampoline >= XOL_VA_BASE, "return address replaced");
    assert_eq!(engine.live_returns(), 1);

    // The function returns: `ret` pops the trampoline address.
    vcpu.regs.set(Gpr::Rsp, sp + 8);
    vcpu.regs.set(Gpr::Rax, 7);
    vcpu.regs.rip = trampoline;
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: trampoline },
        )
        .unwrap();
    assert_eq!(vcpu.regs.rip, caller, "back to the real caller");
    assert_eq!(*seen.lock().unwrap(), vec![(7, 42, caller)]);
    assert_eq!(engine.live_returns(), 0);
    let st = &engine.stats()[0];
    assert_eq!((st.hits, st.returns, st.nmissed), (1, 1, 0));
    assert_eq!(engine.exit_stats().returns, 1);
}

#[test]
fn max_active_and_frames_that_never_return_are_counted_as_nmissed() {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(
            Probe::<X86_64>::new("f")
                .on_return(|_| Ok(()))
                .max_active(2),
            target(0),
            &regs,
        )
        .unwrap();
    let mut state = VcpuProbeState::default();
    let enter = |vcpu: &mut FakeVcpu, state: &mut VcpuProbeState, sp: u64| {
        engine
            .memory()
            .write_obj(
                0xffff_ffff_8100_0777u64,
                GuestAddress(STACK_GPA + (sp - STACK_VA)),
            )
            .unwrap();
        vcpu.regs.set(Gpr::Rsp, sp);
        vcpu.regs.rip = TEXT_VA;
        engine
            .handle_debug(vcpu, state, DebugEvent::Breakpoint { pc: TEXT_VA })
            .unwrap();
    };
    // Three nested entries (recursion): the third is over max_active.
    enter(&mut vcpu, &mut state, STACK_VA + 0x800);
    enter(&mut vcpu, &mut state, STACK_VA + 0x700);
    enter(&mut vcpu, &mut state, STACK_VA + 0x600);
    assert_eq!(engine.live_returns(), 2);
    assert_eq!(engine.stats()[0].nmissed, 1);
    // The outer frame returns although the inner one never did (an unwind past it).
    let trampoline: u64 = engine
        .memory()
        .read_obj(GuestAddress(STACK_GPA + 0x800))
        .unwrap();
    vcpu.regs.set(Gpr::Rsp, STACK_VA + 0x808);
    vcpu.regs.rip = trampoline;
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: trampoline },
        )
        .unwrap();
    assert_eq!(engine.live_returns(), 0, "the dead inner frame is dropped");
    let st = &engine.stats()[0];
    assert_eq!((st.hits, st.returns, st.nmissed), (3, 1, 2));
    // A return nobody recorded cannot be resumed safely: an error, not a guess.
    vcpu.regs.rip = trampoline;
    assert!(
        engine
            .handle_debug(
                &mut vcpu,
                &mut state,
                DebugEvent::Breakpoint { pc: trampoline }
            )
            .is_err()
    );
}

#[test]
fn the_walk_reads_through_the_guests_kprobes_and_never_plants_over_one() {
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    // The guest's kprobe on `mov %rsp,%rbp` (48 89 e5 at +5): an int3 over its REX byte.
    engine
        .memory()
        .write_slice(&[INT3], GuestAddress(TEXT_GPA + 5))
        .unwrap();
    // Unknown guest kprobes: the int3 follows `push %rbp`, which falls through.
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("may be the guest's own breakpoint"),
        "{err}"
    );
    // Known: its byte is put back, the walk finds +8 on a boundary (and +6 inside).
    let mut kprobes = HashMap::new();
    kprobes.insert(
        TEXT_VA + 5,
        GuestKprobe {
            original: vec![0x48],
            span: 1,
        },
    );
    engine.set_guest_kprobes(kprobes.clone());
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x6"), target(6), &regs)
        .unwrap_err();
    assert!(
        err.to_string().contains("not on an instruction boundary"),
        "{err}"
    );
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x5"), target(5), &regs)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("is at the guest's own kprobe at 0xffffffff81000005"),
        "{err}"
    );
    let id = engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap();
    engine.remove(id).unwrap();
    // An optimized guest kprobe at +4 whose jump (and detour) covers push + mov (4 bytes,
    // padded to its 5-byte jump): nothing inside it is probed.
    let mut code = CODE.to_vec();
    code[4..9].copy_from_slice(&[0xe9, 0x10, 0x20, 0x30, 0x40]);
    engine
        .memory()
        .write_slice(&code, GuestAddress(TEXT_GPA))
        .unwrap();
    kprobes.clear();
    kprobes.insert(
        TEXT_VA + 4,
        GuestKprobe {
            original: CODE[4..9].to_vec(),
            span: 4 + 7,
        },
    );
    engine.set_guest_kprobes(kprobes);
    let err = engine
        .plant(Probe::<X86_64>::new("f+0x8"), target(AT_RIPREL), &regs)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("inside the optimized jump of the guest's own kprobe"),
        "{err}"
    );
    let before = text(&engine);
    engine
        .plant(Probe::<X86_64>::new("f+0xf"), target(AT_CALL), &regs)
        .unwrap();
    assert_eq!(
        text(&engine)[..AT_CALL as usize],
        before[..AT_CALL as usize]
    );
}

#[test]
fn without_int3_exits_what_needs_an_int3_of_the_hosts_is_refused_and_nothing_is_written() {
    let (engine, vcpu) = machine();
    let regs = vcpu.regs.clone();
    engine.set_breakpoints_trappable(false);
    let before = text(&engine);
    let hw = |p: Probe<X86_64>| {
        let mut p = p;
        p.trap = TrapKind::Hardware;
        p
    };
    for (probe, at) in [
        (hw(Probe::<X86_64>::new("f").on_return(|_| Ok(()))), 0),
        (
            hw(Probe::<X86_64>::new("f+0x8").after(|_| Ok(()))),
            AT_RIPREL,
        ),
        (Probe::<X86_64>::new("f+0x4"), AT_PUSH),
    ] {
        let err = engine.plant(probe, target(at), &regs).unwrap_err();
        assert!(
            matches!(err.kind, PlantErrorKind::NeedsInt3 { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("needs software-breakpoint traps"),
            "{err}"
        );
    }
    assert_eq!(text(&engine), before);
    assert!(!engine.breakpoint_written(), "#BP need not be trapped");
    // A hardware-breakpoint probe needs none.
    engine
        .plant(hw(Probe::<X86_64>::new("f+0x8")), target(AT_RIPREL), &regs)
        .unwrap();
    assert!(!engine.breakpoint_written());
}

#[test]
fn a_site_the_kernel_rewrites_itself_is_refused_and_nothing_changes() {
    let (engine, vcpu) = machine();
    engine.set_patched_text([TEXT_VA + AT_RIPREL], "a jump label (static key) site");
    let err = engine
        .plant(Probe::new("f+0x8"), target(AT_RIPREL), &vcpu.regs.clone())
        .unwrap_err();
    assert!(
        matches!(err.kind, PlantErrorKind::PatchedByKernel { .. })
            && err.to_string().contains("jump label"),
        "{err}"
    );
    assert_eq!(text(&engine), CODE);
    assert!(engine.is_empty());
}

#[test]
fn a_watchpoint_takes_a_hardware_slot_and_reports_each_write_with_the_value_before() {
    use crate::definition::{WatchAccess, WatchSpec};
    use std::sync::Mutex;
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let var_va = STACK_VA + 0x100;
    engine
        .memory()
        .write_obj(0x1122_3344_5566_7788u64, GuestAddress(STACK_GPA + 0x100))
        .unwrap();
    let seen: Arc<Mutex<Vec<(u64, crate::probe::WatchRecord)>>> = Arc::default();
    let s = seen.clone();
    let mut probe = Probe::<X86_64>::new("var").on_hit(move |ctx| {
        s.lock()
            .unwrap()
            .push((ctx.address, ctx.watch.clone().unwrap()));
        Ok(())
    });
    let spec = WatchSpec {
        len: 8,
        access: WatchAccess::Write,
    };
    probe.watch = Some(spec);
    let g0 = engine.hardware_generation();
    let id = engine
        .plant(probe.clone(), target(var_va - TEXT_VA), &regs)
        .unwrap();
    assert!(engine.hardware_generation() > g0);
    let (slots, _) = engine.hardware_slots();
    assert_eq!(
        slots[0],
        Some(crate::vm::HardwareSlot {
            va: var_va,
            watch: Some(spec)
        })
    );
    assert_eq!(text(&engine), CODE, "no text touched");
    // The guest writes, the trap comes after the store with RIP past it.
    let mut state = VcpuProbeState::default();
    for value in [0xaau64, 0xbb] {
        engine
            .memory()
            .write_obj(value, GuestAddress(STACK_GPA + 0x100))
            .unwrap();
        let verdict = engine
            .handle_debug(
                &mut vcpu,
                &mut state,
                DebugEvent::Watchpoint {
                    pc: TEXT_VA + 4,
                    slots: 1,
                    writer: None,
                },
            )
            .unwrap();
        assert_eq!(verdict, Verdict::Resume);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, TEXT_VA + 4, "the PC after the access");
    assert_eq!(
        (
            seen[0].1.address,
            seen[0].1.old_value(),
            seen[0].1.new_value()
        ),
        (var_va, 0x1122_3344_5566_7788, 0xaa)
    );
    assert_eq!((seen[1].1.old_value(), seen[1].1.new_value()), (0xaa, 0xbb));
    let stats = engine.stats();
    assert_eq!(
        (stats.len(), stats[0].plan, stats[0].hits, stats[0].address),
        (1, PlanKind::Watch, 2, var_va)
    );
    assert_eq!(stats[0].instruction, "8 bytes, w");
    // A slot that is not ours: the guest's own debug exception.
    assert_eq!(
        engine
            .handle_debug(
                &mut vcpu,
                &mut state,
                DebugEvent::Watchpoint {
                    pc: TEXT_VA,
                    slots: 2,
                    writer: None
                }
            )
            .unwrap(),
        Verdict::ReinjectDebug
    );
    // Misaligned, unmapped: refused, nothing taken.
    let misaligned = engine
        .plant(probe.clone(), target(var_va - TEXT_VA + 4), &regs)
        .unwrap_err();
    assert!(
        matches!(
            misaligned.kind,
            PlantErrorKind::WatchMisaligned { len: 8, .. }
        ),
        "{misaligned}"
    );
    let unmapped = engine
        .plant(
            probe.clone(),
            PlantTarget {
                va: 0xffff_ffff_c000_0000,
                function_start: None,
            },
            &regs,
        )
        .unwrap_err();
    assert!(
        matches!(unmapped.kind, PlantErrorKind::NotMapped { .. }),
        "{unmapped}"
    );
    // The slots are shared with execute breakpoints: three more of either, then none.
    for off in [0, AT_PUSH, 5] {
        engine
            .plant(
                Probe::<X86_64>::new(format!("f+{off}")).hardware(),
                target(off),
                &regs,
            )
            .unwrap();
    }
    let full = engine
        .plant(probe, target(var_va - TEXT_VA + 8), &regs)
        .unwrap_err();
    assert!(matches!(
        full.kind,
        PlantErrorKind::NoHardwareBreakpoint { count: 4 }
    ));
    engine.remove(id).unwrap();
    assert_eq!(engine.hardware_slots().0[0], None, "its slot is free again");
}

#[test]
fn handlers_see_the_flags_without_rf_as_the_guests_own_trap_frame_has_them() {
    use std::sync::Mutex;
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = seen.clone();
    engine
        .plant(
            Probe::<X86_64>::new("f").on_hit(move |ctx| {
                s.lock().unwrap().push(ctx.regs.rflags);
                Ok(())
            }),
            target(0),
            &regs,
        )
        .unwrap();
    // KVM may still hold RF at the intercept (an iret into the instruction set it).
    vcpu.regs.rip = TEXT_VA;
    vcpu.regs.rflags = 0x1_0246;
    let mut state = VcpuProbeState::default();
    engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint { pc: TEXT_VA },
        )
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![0x246]);
    assert_eq!(vcpu.regs.rflags, 0x246, "and the guest resumes without it");
}

#[test]
fn a_protected_region_reports_writes_to_its_bytes_and_completes_or_drops_them() {
    use crate::protect::{ProtectAction, ProtectSpec};
    use std::sync::Mutex;
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let seen: Arc<Mutex<Vec<crate::probe::WatchRecord>>> = Arc::default();
    let plant = |off: u64, len: u64, action: ProtectAction| {
        let s = seen.clone();
        let mut probe = Probe::<X86_64>::new(format!("var+{off}")).on_hit(move |ctx| {
            s.lock().unwrap().push(ctx.watch.clone().unwrap());
            Ok(())
        });
        probe.protect = Some(ProtectSpec { len, action });
        engine.plant(probe, target(STACK_VA + off - TEXT_VA), &regs)
    };
    // Bytes 0x100..0x108 let through, 0x108..0x110 dropped; both on the stack page.
    plant(0x100, 8, ProtectAction::Allow).unwrap();
    let (_, g0) = engine.protected_pages();
    plant(0x108, 8, ProtectAction::Deny).unwrap();
    let (pages, g1) = engine.protected_pages();
    assert!(g1 > g0);
    assert_eq!(
        pages,
        vec![(STACK_GPA, STACK_GPA + 0x1000)],
        "one page, once"
    );
    // Overlapping an earlier region: refused by name, nothing added.
    let err = plant(0x10c, 8, ProtectAction::Allow).unwrap_err();
    assert!(
        err.to_string()
            .contains("overlaps the protected region var+264"),
        "{err}"
    );
    assert_eq!(engine.protected_pages().1, g1);
    let mem = engine.memory();
    mem.write_slice(&[0x11; 0x20], GuestAddress(STACK_GPA + 0xf8))
        .unwrap();
    // A 16-byte store across both regions and a neighbour byte before them.
    let data: Vec<u8> = (0..16).collect();
    let out = engine
        .protected_write(&mut vcpu, false, STACK_GPA + 0x100, &data)
        .unwrap();
    assert_eq!(
        out,
        ProtectedStore::Done {
            old: vec![0x11; 16]
        }
    );
    let mut now = [0u8; 16];
    mem.read_slice(&mut now, GuestAddress(STACK_GPA + 0x100))
        .unwrap();
    assert_eq!(now[..8], data[..8], "allowed bytes written");
    assert_eq!(now[8..], [0x11; 8], "denied bytes kept");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let mut at: Vec<u64> = seen.iter().map(|r| r.address).collect();
        at.sort_unstable();
        assert_eq!(at, vec![STACK_VA + 0x100, STACK_VA + 0x108]);
        let deny = seen.iter().find(|r| r.address == STACK_VA + 0x108).unwrap();
        assert_eq!(
            (deny.old.clone(), deny.new.clone(), deny.action),
            (vec![0x11; 8], data[8..].to_vec(), Some(ProtectAction::Deny))
        );
    }
    // A store to the rest of the page: completed silently, counted.
    engine
        .protected_write(&mut vcpu, false, STACK_GPA + 0xf8, &[7; 8])
        .unwrap();
    mem.read_slice(&mut now[..8], GuestAddress(STACK_GPA + 0xf8))
        .unwrap();
    assert_eq!(now[..8], [7; 8]);
    assert_eq!(seen.lock().unwrap().len(), 2);
    // A failed compare-and-swap stores nothing and reports nothing.
    let out = engine
        .protected_update(&mut vcpu, false, STACK_GPA + 0x100, 8, |_| None)
        .unwrap();
    assert_eq!(
        out,
        ProtectedStore::Done {
            old: data[..8].to_vec()
        }
    );
    // Elsewhere: not the engine's.
    assert_eq!(
        engine
            .protected_write(&mut vcpu, false, TEXT_GPA, &[0])
            .unwrap(),
        ProtectedStore::NotProtected
    );
    let e = engine.exit_stats();
    assert_eq!((e.protected_writes, e.neighbour_writes), (1, 1));
    let stats = engine.stats();
    assert_eq!(
        stats.iter().map(|s| (s.plan, s.hits)).collect::<Vec<_>>(),
        vec![(PlanKind::Protect, 1), (PlanKind::Protect, 1)]
    );
    // Removing them leaves no protected page.
    engine.remove_all();
    assert!(engine.protected_pages().0.is_empty());
}

#[test]
fn a_store_exclusive_holds_only_when_no_store_reached_its_granule_since_its_reservation() {
    use crate::protect::{ProtectAction, ProtectSpec};
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let mut probe = Probe::<X86_64>::new("var");
    probe.protect = Some(ProtectSpec {
        len: 8,
        action: ProtectAction::Allow,
    });
    engine
        .plant(probe, target(STACK_VA + 0x100 - TEXT_VA), &regs)
        .unwrap();
    let gpa = STACK_GPA + 0x100;
    // The first try fails and reserves; the retry holds; a second retry needs a new one.
    assert!(!engine.exclusive_store_holds(0, gpa));
    assert!(engine.exclusive_store_holds(0, gpa));
    assert!(!engine.exclusive_store_holds(0, gpa));
    // vCPU 1 stores to the granule between vCPU 0's reservation and its retry: it fails.
    engine
        .protected_write(&mut vcpu, false, gpa + 8, &[1])
        .unwrap();
    assert!(
        !engine.exclusive_store_holds(0, gpa),
        "reserved after the store"
    );
    engine
        .protected_write(&mut vcpu, false, gpa + 8, &[2])
        .unwrap();
    assert!(
        !engine.exclusive_store_holds(0, gpa),
        "a store since the reservation"
    );
    // A store to another granule leaves the reservation alone.
    engine
        .protected_write(&mut vcpu, false, gpa + 64, &[3])
        .unwrap();
    assert!(engine.exclusive_store_holds(0, gpa));
}

#[test]
fn an_exempted_writer_writes_protected_bytes_in_full_unreported() {
    use crate::protect::{ProtectAction, ProtectSpec};
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let reported = Arc::new(AtomicU64::new(0));
    let r = reported.clone();
    let mut probe = Probe::<X86_64>::new("var").on_hit(move |_| {
        r.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    probe.protect = Some(ProtectSpec {
        len: 8,
        action: ProtectAction::Deny,
    });
    engine
        .plant(probe, target(STACK_VA + 0x100 - TEXT_VA), &regs)
        .unwrap();
    let gpa = STACK_GPA + 0x100;
    // Exempt when the writer's PC is the one this test gives the vCPU.
    let exempt_pc = vcpu.regs.rip;
    engine.set_protect_exemption(Arc::new(move |ctx| ctx.regs.rip == exempt_pc));
    engine
        .protected_write(&mut vcpu, false, gpa, &[5; 8])
        .unwrap();
    let mut now = [0u8; 8];
    engine
        .memory()
        .read_slice(&mut now, GuestAddress(gpa))
        .unwrap();
    assert_eq!(now, [5; 8], "made in full despite deny");
    assert_eq!(reported.load(Ordering::Relaxed), 0);
    // Another writer: denied and reported.
    vcpu.regs.rip += 1;
    engine
        .protected_write(&mut vcpu, false, gpa, &[6; 8])
        .unwrap();
    engine
        .memory()
        .read_slice(&mut now, GuestAddress(gpa))
        .unwrap();
    assert_eq!((now, reported.load(Ordering::Relaxed)), ([5; 8], 1));
    let e = engine.exit_stats();
    assert_eq!((e.protected_writes, e.exempted_writes), (2, 1));
}
