//! The engine's contract, once for every architecture: each test is generic over
//! [`FakeMachine`] and runs on x86_64's and aarch64's fake machines. What only one
//! architecture has (boosted slots, BTYPE, pointer authentication) stays in its own tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::{PlanKind, RegisterFile};
use crate::engine::{PlantErrorKind, PlantTarget, ProbeEngine, RemoveError, VcpuProbeState};
use crate::fake::FakeMachine;
use crate::probe::Probe;
use crate::vm::{DebugEvent, Verdict};

fn target<A: FakeMachine>(off: u64) -> PlantTarget {
    PlantTarget {
        va: A::TEXT_VA + off,
        function_start: Some(A::TEXT_VA),
    }
}

fn text<A: FakeMachine>(engine: &ProbeEngine<A, GuestMemoryMmap>) -> Vec<u8> {
    let mut b = vec![0u8; A::code().len()];
    engine
        .memory()
        .read_slice(&mut b, GuestAddress(A::TEXT_GPA))
        .unwrap();
    b
}

/// A probe is planted (the breakpoint in the text), hit (handler, emulation, the guest goes
/// on past the instruction, one exit) and removed byte for byte.
fn a_probe_is_planted_hit_and_removed_byte_for_byte<A: FakeMachine>() {
    let (engine, mut vcpu) = A::machine();
    let (at, next) = A::EMULATED;
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let probe = Probe::<A>::new("f").on_hit(move |ctx| {
        assert_eq!(ctx.regs.pc(), A::TEXT_VA + at);
        h.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let regs = vcpu.regs.clone();
    let id = engine.plant(probe, target::<A>(at), &regs).unwrap();
    let n = A::BREAKPOINT.len();
    assert_eq!(&text(&engine)[at as usize..at as usize + n], A::BREAKPOINT);
    vcpu.regs.set_pc(A::TEXT_VA + at);
    let mut state = VcpuProbeState::default();
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut state,
            DebugEvent::Breakpoint {
                pc: A::TEXT_VA + at,
            },
        )
        .unwrap();
    assert_eq!(v, Verdict::Resume);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(state.site_hits(), 1, "the hit is this vCPU's");
    assert_eq!(vcpu.regs.pc(), A::TEXT_VA + next);
    let stats = engine.stats();
    assert_eq!((stats[0].hits, stats[0].plan), (1, PlanKind::Emulate));
    assert_eq!(engine.exit_stats().breakpoints, 1);
    assert_eq!(engine.remove(id).unwrap(), None);
    assert_eq!(text(&engine), A::code());
    assert!(engine.is_empty());
    // Removed once: a second removal names the id and changes nothing.
    let err = engine.remove(id).unwrap_err();
    assert!(
        matches!(err, RemoveError::UnknownProbe(i) if i == id),
        "{err}"
    );
    assert_eq!(text(&engine), A::code());
}

/// A location off an instruction boundary, or unmapped, is refused by name and nothing in the
/// guest changes.
fn bad_locations_are_refused_and_change_nothing<A: FakeMachine>() {
    let (engine, vcpu) = A::machine();
    let regs = vcpu.regs.clone();
    let err = engine
        .plant(Probe::<A>::new("inside"), target::<A>(A::INSIDE), &regs)
        .unwrap_err();
    assert!(
        err.to_string().contains("not on an instruction boundary"),
        "{err}"
    );
    let unmapped = A::TEXT_VA + 0x10_0000;
    let err = engine
        .plant(
            Probe::<A>::new("far"),
            PlantTarget {
                va: unmapped,
                function_start: None,
            },
            &regs,
        )
        .unwrap_err();
    assert!(
        matches!(err.kind, PlantErrorKind::NotMapped { .. }),
        "{err}"
    );
    assert_eq!(err.location, "far", "the error names the probe's location");
    assert_eq!(text(&engine), A::code());
    assert!(engine.is_empty());
}

/// A breakpoint of the guest's own, where no probe is, goes back to the guest unchanged.
fn a_breakpoint_of_the_guests_own_goes_back_to_it<A: FakeMachine>() {
    let (engine, mut vcpu) = A::machine();
    let regs = vcpu.regs.clone();
    engine
        .plant(Probe::<A>::new("f"), target::<A>(A::EMULATED.0), &regs)
        .unwrap();
    engine
        .memory()
        .write_slice(&A::guest_breakpoint(), GuestAddress(A::TEXT_GPA + A::SPARE))
        .unwrap();
    let own = A::TEXT_VA + A::SPARE;
    vcpu.regs.set_pc(own);
    let before = vcpu.regs.clone();
    let v = engine
        .handle_debug(
            &mut vcpu,
            &mut VcpuProbeState::default(),
            DebugEvent::Breakpoint { pc: own },
        )
        .unwrap();
    assert_eq!(v, Verdict::Reinject);
    assert_eq!(vcpu.regs.pc(), before.pc());
    assert_eq!(vcpu.regs.sp(), before.sp());
    assert_eq!(vcpu.regs.general_purpose(), before.general_purpose());
    assert_eq!(engine.exit_stats().reinjected, 1);
}

/// Hardware probes leave the text alone and take the breakpoints KVM reports, no more.
fn hardware_probes_leave_the_text_alone_and_stop_at_the_count<A: FakeMachine>() {
    let (engine, vcpu) = A::machine();
    engine.set_hardware_breakpoint_count(1);
    let regs = vcpu.regs.clone();
    let g0 = engine.hardware_generation();
    engine
        .plant(
            Probe::<A>::new("f").hardware(),
            target::<A>(A::EMULATED.0),
            &regs,
        )
        .unwrap();
    assert!(engine.hardware_generation() > g0);
    let err = engine
        .plant(
            Probe::<A>::new("g").hardware(),
            target::<A>(A::OTHER),
            &regs,
        )
        .unwrap_err();
    assert!(
        matches!(
            err.kind,
            PlantErrorKind::NoHardwareBreakpoint { count: 1, .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("all 1 hardware breakpoints are in use"),
        "{err}"
    );
    assert_eq!(
        engine.hardware_breakpoints().0,
        vec![Some(A::TEXT_VA + A::EMULATED.0)]
    );
    assert_eq!(text(&engine), A::code());
}

/// Each test, once per architecture.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod x86_64 {
            $(#[test]
            fn $test() {
                super::$test::<crate::arch::x86_64::X86_64>();
            })*
        }
        mod aarch64 {
            $(#[test]
            fn $test() {
                super::$test::<crate::arch::aarch64::Aarch64>();
            })*
        }
    };
}

conformance!(
    a_probe_is_planted_hit_and_removed_byte_for_byte,
    bad_locations_are_refused_and_change_nothing,
    a_breakpoint_of_the_guests_own_goes_back_to_it,
    hardware_probes_leave_the_text_alone_and_stop_at_the_count,
);
