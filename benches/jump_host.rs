//! Host-side costs of the jump plan: generating one trampoline (decode, plan, encode) on each
//! architecture,
//! and draining recorded hits from a ring into a probe's handler (records a second). Run with
//! `cargo bench -p probe-core --bench jump_host`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use probe_core::arch::aarch64::{Aarch64, CpuFeatures};
use probe_core::arch::x86_64::{Decoder, X86_64};
use probe_core::arch::{Arch, InstructionDecoder};
use probe_core::engine::PlantTarget;
use probe_core::fake::{AT_RIPREL, TEXT_VA, jump_anchors, jump_rings, machine};
use probe_core::jump::{RECORD_SIZE, RING_HEADER, TrampolineSpec, header, record};
use probe_core::probe::Probe;
use vm_memory::{Bytes, GuestAddress};

fn generate(c: &mut Criterion) {
    let spec = TrampolineSpec {
        tag: 1,
        site: 0xffff_ffff_810b_0f40,
        at: 0xffff_ffff_7fe0_1000,
        rings: jump_rings(),
        anchors: jump_anchors(),
        filter: None,
    };
    let d = Decoder::new().unwrap();
    let fentry = [0x0f, 0x1f, 0x44, 0x00, 0x00];
    c.bench_function("jump/trampoline for a fentry site", |b| {
        b.iter(|| {
            let insn =
                InstructionDecoder::<X86_64>::decode(&d, black_box(&fentry), spec.site).unwrap();
            let plan = InstructionDecoder::<X86_64>::plan(&d, &insn).unwrap();
            black_box(X86_64::jump_patch(&plan, &insn, &spec).unwrap())
        })
    });
    let spec = TrampolineSpec {
        site: 0xffff_8000_080b_44f0,
        at: 0xffff_8000_0939_0000,
        ..spec
    };
    let d = probe_core::arch::aarch64::Decoder::new(CpuFeatures::WITHOUT_PAC).unwrap();
    // mov x9, x30: ftrace's first word of every traceable function after boot.
    let entry = 0xaa1e_03e9u32.to_le_bytes();
    c.bench_function("jump/arm64 trampoline for a function entry", |b| {
        b.iter(|| {
            let insn =
                InstructionDecoder::<Aarch64>::decode(&d, black_box(&entry), spec.site).unwrap();
            let plan = InstructionDecoder::<Aarch64>::plan(&d, &insn).unwrap();
            black_box(Aarch64::jump_patch(&plan, &insn, &spec).unwrap())
        })
    });
}

fn drain(c: &mut Criterion) {
    let (engine, vcpu) = machine();
    let rings = jump_rings();
    assert!(engine.enable_jump(rings, jump_anchors()));
    let probe = Probe::<X86_64>::new("f+0x8").in_guest().on_hit(|ctx| {
        black_box(ctx.regs.rip);
        Ok(())
    });
    let target = PlantTarget {
        va: TEXT_VA + AT_RIPREL,
        function_start: Some(TEXT_VA),
    };
    engine.plant(probe, target, &vcpu.regs.clone()).unwrap();
    let mem = engine.memory();
    let ring = rings.gpa + rings.ring_offset(0);
    for i in 0..rings.records {
        let at = ring + RING_HEADER + i * RECORD_SIZE;
        mem.write_obj(0u32, GuestAddress(at + record::TAG)).unwrap();
    }
    let mut head = 0u64;
    c.bench_function("jump/drain 4 records into a handler", |b| {
        b.iter(|| {
            head += rings.records;
            mem.write_obj(head, GuestAddress(ring + header::HEAD))
                .unwrap();
            assert_eq!(engine.drain_jump_rings(), rings.records as usize);
        })
    });
}

criterion_group!(benches, generate, drain);
criterion_main!(benches);
