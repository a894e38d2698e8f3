//! Host-side costs of the probe engine: resolving a probe location against a kernel-sized
//! symbol table, symbolizing a hit address, a page walk per translation, and the engine's own
//! time per probe hit for each step plan (a fake vCPU over real guest memory, so the figure
//! excludes the VM exit itself). Run with `cargo bench -p probe-core`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use probe_core::arch::x86_64::Gpr;
use probe_core::engine::{PlantTarget, VcpuProbeState};
use probe_core::fake::{AT_CALL, AT_PUSH, AT_RIPREL, STACK_VA, TEXT_VA, machine};
use probe_core::pagewalk::{PagingMode, PhysRead, translate};
use probe_core::probe::Probe;
use probe_core::symbols::SymbolMap;
use probe_core::vm::DebugEvent;

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

impl PhysRead for Tables {
    fn read_phys_u64(&self, gpa: u64) -> Option<u64> {
        Some(*self.0.get(&gpa).unwrap_or(&0))
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

/// One hit per iteration on a probe at `offset` of the fake text, the step completed too
/// when the plan steps out of line; registers are reset each time.
fn hit_cost(c: &mut Criterion, name: &str, offset: u64, with_handler: bool) {
    let (engine, mut vcpu) = machine();
    let regs = vcpu.regs.clone();
    let mut probe = Probe::new(name);
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
            if state.stepping() {
                let slot_end = vcpu.regs.rip + 7;
                engine
                    .handle_debug(
                        &mut vcpu,
                        &mut state,
                        DebugEvent::SingleStep { pc: slot_end },
                    )
                    .unwrap();
            }
        })
    });
}

fn hits(c: &mut Criterion) {
    hit_cost(c, "hit/emulate_push", AT_PUSH, false);
    hit_cost(c, "hit/emulate_push_with_handler", AT_PUSH, true);
    hit_cost(c, "hit/xol_riprel_step", AT_RIPREL, false);
    hit_cost(c, "hit/xol_indirect_call_step", AT_CALL, false);
}

criterion_group!(benches, engine, hits);
criterion_main!(benches);
