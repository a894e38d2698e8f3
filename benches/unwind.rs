//! Host-side cost of a kernel stack trace at a hit: a 10- and a 30-frame walk of a made-up
//! stack in the fake machines' real guest memory, through their page tables (ORC on x86_64,
//! frame records on arm64), and a 30-frame stack's symbolization against a kernel-sized
//! System.map. The runner's figure (a whole hit with `--stack` against one without) is in
//! docs/probing.md. Run with `cargo bench -p probe-core --bench unwind`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use probe_core::arch::aarch64::Aarch64;
use probe_core::arch::x86_64::{Gpr, X86_64};
use probe_core::fake;
use probe_core::symbols::SymbolMap;
use probe_core::unwind::orc::{OrcLayout, OrcTable};
use probe_core::unwind::testing::{layout, task_stacks};
use probe_core::unwind::x86_64::OrcUnwind;
use probe_core::unwind::{KernelUnwinder, TraceEnd};
use vm_memory::{Bytes, GuestAddress};

/// A table over made-up text: a call frame for every function at +0x40 * k, and a kernel
/// thread's end-of-stack rule at +0x1000.
fn orc() -> OrcUnwind {
    let t = fake::TEXT_VA;
    let base = t + 0x10_0000;
    let mut rules: Vec<(u64, [u8; 6])> = (0..64).map(|k| (k * 0x40, [8, 0, 0, 0, 5, 0])).collect();
    rules.push((0x1000, [0, 0, 0, 0, 0, 4]));
    let ips: Vec<u8> = rules
        .iter()
        .enumerate()
        .flat_map(|(i, (off, _))| {
            (((t + off) as i64 - (base + 4 * i as u64) as i64) as i32).to_le_bytes()
        })
        .collect();
    let entries: Vec<u8> = rules.iter().flat_map(|(_, e)| *e).collect();
    OrcUnwind {
        table: OrcTable::parse(&ips, base, &entries, OrcLayout::V4_14).unwrap(),
        text: vec![(t, t + 0x2000)],
        ftrace: None,
    }
}

fn x86_stack(c: &mut Criterion) {
    let unwinder = KernelUnwinder::<X86_64>::from_parts(orc(), layout(false));
    for frames in [10u64, 30] {
        let (engine, mut vcpu) = fake::machine();
        let mem = engine.memory();
        let sp = fake::STACK_VA + 0x400;
        for i in 0..frames - 1 {
            let ret = if i + 2 == frames {
                fake::TEXT_VA + 0x1008
            } else {
                fake::TEXT_VA + 0x48 + 0x40 * (i % 32)
            };
            mem.write_obj(ret, GuestAddress(fake::STACK_GPA + 0x400 + 8 * i))
                .unwrap();
        }
        vcpu.regs.rip = fake::TEXT_VA + 0x10;
        vcpu.regs.set(Gpr::Rsp, sp);
        let ctx = fake::context(mem, &vcpu.regs);
        let t = unwinder.unwind_on(&ctx, task_stacks(fake::STACK_VA), 0);
        assert_eq!(
            (t.frames.len() as u64, &t.end),
            (frames, &TraceEnd::EndOfStack),
            "{t:?}"
        );
        c.bench_function(&format!("unwind x86_64 ORC, {frames} frames"), |b| {
            b.iter(|| black_box(unwinder.unwind_on(&ctx, task_stacks(fake::STACK_VA), 0)))
        });
    }
}

fn arm64_stack(c: &mut Criterion) {
    use fake::aarch64::{STACK_GPA, STACK_VA, TEXT_VA};
    let unwinder = KernelUnwinder::<Aarch64>::from_parts((), layout(true));
    for frames in [10u64, 30] {
        let (engine, mut vcpu) = fake::aarch64::machine();
        let mem = engine.memory();
        let regs = STACK_VA + 4096 - 336;
        let record = |i: u64| STACK_VA + 0x100 + 0x20 * i;
        for i in 0..frames - 1 {
            let next = if i + 2 == frames {
                regs + 304
            } else {
                record(i + 1)
            };
            let at = STACK_GPA + (record(i) - STACK_VA);
            mem.write_obj(next, GuestAddress(at)).unwrap();
            mem.write_obj(TEXT_VA + 0x40 * i, GuestAddress(at + 8))
                .unwrap();
        }
        vcpu.regs.pc = TEXT_VA + 0x10;
        vcpu.regs.x[29] = record(0);
        let ctx = fake::aarch64::context(mem, &vcpu.regs);
        let t = unwinder.unwind_on(&ctx, task_stacks(STACK_VA), 0);
        assert_eq!(
            (t.frames.len() as u64, &t.end),
            (frames, &TraceEnd::EndOfStack),
            "{t:?}"
        );
        c.bench_function(
            &format!("unwind arm64 frame records, {frames} frames"),
            |b| b.iter(|| black_box(unwinder.unwind_on(&ctx, task_stacks(STACK_VA), 0))),
        );
    }
}

fn symbolize(c: &mut Criterion) {
    let mut text = String::new();
    for i in 0..100_000u64 {
        text.push_str(&format!(
            "{:016x} T fn_{i}\n",
            0xffff_ffff_8100_0000u64 + i * 0x40
        ));
    }
    let map = SymbolMap::parse(&text).unwrap();
    let trace = probe_core::unwind::StackTrace {
        frames: (0..30)
            .map(|i| 0xffff_ffff_8100_0000u64 + i * 0x1_0007)
            .collect(),
        end: TraceEnd::UserMode,
    };
    c.bench_function("symbolize a 30-frame stack (100k symbols)", |b| {
        b.iter(|| black_box(trace.symbolized(&map, 0)))
    });
}

criterion_group!(benches, x86_stack, arm64_stack, symbolize);
criterion_main!(benches);
