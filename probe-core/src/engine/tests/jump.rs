//! The jump plan on the fake machine: planting writes a trampoline and a jump, records in the
//! ring reach the handlers through the drain, removal restores the text.

use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::jump::{FLAG_TASK, GuestAnchors, RING_HEADER, RingLayout, TaskOffsets, header, record};

fn anchors() -> GuestAnchors {
    GuestAnchors {
        cpu_number: Some(0x10),
        current_task: Some(0x18),
        this_cpu_off: Some(0x20),
        task: Some(TaskOffsets {
            pid: 0x40,
            tgid: 0x44,
            comm: 0x80,
            stack: 0x8,
        }),
        thread_size: 16384,
    }
}

#[test]
fn a_jump_site_records_in_the_guest_and_the_drain_runs_its_handlers() {
    let (engine, vcpu) = machine();
    let rings = jump_rings();
    assert!(engine.enable_jump(rings, anchors()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layout = crate::task::TaskLayout {
        current_task: Some(0x18),
        pid: 0x40,
        tgid: 0x44,
        comm: 0x80,
    };
    let probe = Probe::<X86_64>::new("f+0x8").in_guest().on_hit(move |ctx| {
        let task = layout.current(ctx)?;
        let sp = ctx.regs.get(Gpr::Rsp);
        s.lock().unwrap().push((
            ctx.vcpu,
            ctx.regs.get(Gpr::Rdi),
            ctx.regs.rip,
            task.comm,
            task.pid,
            ctx.read_u64(sp + 8)?,
            ctx.read_u64(sp).is_err(),
        ));
        Ok(())
    });
    let regs = vcpu.regs.clone();
    let id = engine.plant(probe, target(AT_RIPREL), &regs).unwrap();
    let t = text(&engine);
    assert_eq!(
        t[AT_RIPREL as usize], 0xe9,
        "a jmp rel32 over the instruction"
    );
    let at = AT_RIPREL as usize;
    let rel = i32::from_le_bytes(t[at + 1..at + 5].try_into().unwrap());
    let trampoline = (TEXT_VA + AT_RIPREL + 5).wrapping_add(rel as i64 as u64);
    assert!((XOL_VA_BASE..XOL_VA_BASE + 4 * 4096).contains(&trampoline));
    assert_eq!(
        &t[at + 5..],
        &CODE[at + 5..],
        "only the jump's bytes change"
    );
    let stats = engine.stats();
    assert_eq!(
        (stats[0].plan, stats[0].jump_refusal),
        (PlanKind::Jump, None)
    );
    assert!(engine.has_jump_sites());

    // A record as the trampoline writes it, then one with a tag no site has (forged).
    let mem = engine.memory();
    let ring = rings.gpa + rings.ring_offset(0);
    let w64 = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).unwrap();
    let rec = ring + RING_HEADER;
    w64(rec + record::TAG, u64::from(FLAG_TASK | 0b10) << 32);
    w64(rec + record::REGS + 8 * 7, 0x1234);
    w64(rec + record::REGS + 8 * 4, STACK_VA + 0x800);
    w64(rec + record::REGS + 8 * 16, TEXT_VA + AT_RIPREL);
    w64(rec + record::TASK, 0x5000);
    w64(rec + record::TASK_FROM, 0x9000);
    w64(rec + record::PID, 77 | (70 << 32));
    mem.write_slice(b"getpid-loop\0", GuestAddress(rec + record::COMM))
        .unwrap();
    w64(rec + record::STACK + 8, 0x77);
    w64(rec + crate::jump::RECORD_SIZE + record::TAG, 9);
    w64(ring + header::HEAD, 2);
    assert_eq!(engine.drain_jump_rings(), 2);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(
            0,
            0x1234,
            TEXT_VA + AT_RIPREL,
            "getpid-loop".to_string(),
            77,
            0x77,
            true
        )]
    );
    assert_eq!(engine.drain_jump_rings(), 0);
    // Hits the trampolines dropped count as the probe's missed; hits its task filter left out
    // count as hits.
    w64(rings.gpa + RingLayout::site_missed_offset(0), 3);
    w64(rings.gpa + RingLayout::site_filtered_offset(0), 5);
    let stats = engine.stats();
    assert_eq!((stats[0].hits, stats[0].missed), (6, 3));
    let by_plan = engine.exit_stats().hits_by_plan;
    assert!(by_plan.contains(&(PlanKind::Jump, 6)));

    // A probe that needs exits turns the site into a trapped one for both probes: a hit
    // recorded meanwhile is drained first, the guest's bytes go back under an int3, the jump
    // probe keeps its id and counts.
    w64(ring + header::HEAD, 3);
    w64(rec + 2 * crate::jump::RECORD_SIZE + record::TAG, 0);
    let after = engine
        .plant(
            Probe::<X86_64>::new("f+0x8").after(|_| Ok(())),
            target(AT_RIPREL),
            &regs,
        )
        .unwrap();
    let t = text(&engine);
    assert_eq!(t[at], INT3);
    assert_eq!(&t[at + 1..], &CODE[at + 1..]);
    let stats = engine.stats();
    assert_eq!(stats.len(), 2);
    assert!(
        stats.iter().all(|s| s.plan == PlanKind::XolRiprel),
        "{stats:?}"
    );
    // The record written before the change was drained (a hit; its handler failed: the
    // record holds no task), and the trampoline's missed count stays the probe's.
    assert_eq!(
        (
            stats[0].id,
            stats[0].hits,
            stats[0].missed,
            stats[0].handler_errors
        ),
        (id, 7, 3, 1)
    );
    // Records left for a site that is no longer a jump site are dropped.
    w64(ring + header::HEAD, 4);
    w64(rec + 3 * crate::jump::RECORD_SIZE + record::TAG, 0);
    engine.drain_jump_rings();
    assert_eq!(engine.stats()[0].hits, 7);

    engine.remove(id).unwrap();
    engine.remove(after).unwrap();
    assert_eq!(text(&engine), CODE, "the text is as it was");
}

#[test]
fn a_site_the_jump_cannot_take_falls_back_to_exits_and_says_why() {
    let (engine, vcpu) = machine();
    assert!(engine.enable_jump(jump_rings(), anchors()));
    let regs = vcpu.regs.clone();
    engine
        .plant(
            Probe::<X86_64>::new("f+0x4").in_guest(),
            target(AT_PUSH),
            &regs,
        )
        .unwrap();
    assert_eq!(text(&engine)[AT_PUSH as usize], INT3);
    let s = &engine.stats()[0];
    assert_eq!(s.plan, PlanKind::Emulate);
    assert!(s.jump_refusal.unwrap().contains("shorter"));
    // Without the rings, an in-guest probe is an exit probe too.
    let (engine, vcpu) = machine();
    engine
        .plant(
            Probe::<X86_64>::new("f+0x8").in_guest(),
            target(AT_RIPREL),
            &vcpu.regs.clone(),
        )
        .unwrap();
    assert_eq!(text(&engine)[AT_RIPREL as usize], INT3);
    assert!(engine.stats()[0].jump_refusal.unwrap().contains("off"));
}
