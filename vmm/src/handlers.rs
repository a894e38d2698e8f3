//! The handlers the command line gives each probe: a hit line or a kprobe_events line (text
//! or JSON) to the run's output and to the API's event streams, and the `--hist` count of
//! return values, wired from the run's options. The handlers themselves format through
//! [`crate::report`]. [`LiveProbes`] makes probes the same way while the VM runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use probe_core::probe::{Probe, ProbeContext, TrapKind};
use probe_core::symbols::SymbolMap;
use probe_core::task::TaskLayout;

use crate::api::events::{EventHub, StreamFormat};
use crate::job::{ResolvedProbe, expand_globs, resolve_probe};
use crate::machine::{ProbeRequest, ProbeSource};
use crate::output::TraceOutput;
use crate::refusal::RefusedProbe;
use crate::report::{self, RetvalHistogram};
use crate::stacks::StackWiring;
use probe_core::catalog::{self, FunctionInfo, KprobeBlacklist};

/// What every probe's handlers share, from the run's options.
#[derive(Clone)]
pub struct HandlerWiring {
    /// The trap every probe uses.
    pub trap: TrapKind,
    /// The jump plan is on (`--plan auto`): probes whose handlers need only what a jump
    /// record holds may run without exits.
    pub jump: bool,
    /// Print a line per hit (not `--quiet`).
    pub print: bool,
    /// Lines as JSON (`--json`).
    pub json: bool,
    /// Count return values (`--hist`).
    pub hist: bool,
    /// The guest's System.map, for symbolizing addresses.
    pub map: Arc<SymbolMap>,
    /// Where the current task is, when a definition asks for it.
    pub task: Option<Arc<TaskLayout>>,
    /// The KASLR slide, once planting found it.
    pub slide: Arc<AtomicU64>,
    /// Where lines go.
    pub output: Arc<TraceOutput>,
    /// The API's event streams (`--api-socket`).
    pub hub: Option<Arc<EventHub>>,
    /// The stack unwinder, when stacks were asked for and the kernel can be unwound.
    pub stacks: Option<Arc<StackWiring>>,
}

impl HandlerWiring {
    /// The probe of `resolved` with its handlers, ready to plant; a `--hist` histogram it
    /// counts into is added to `hists`.
    pub fn request(
        &self,
        resolved: ResolvedProbe,
        hists: &mut Vec<Arc<RetvalHistogram>>,
    ) -> ProbeRequest {
        let spec = resolved.spec.clone();
        let event = match &resolved.definition {
            Some(def) => format!("{}/{}", def.group, def.event),
            None => resolved.location.clone(),
        };
        let hist = match &resolved.definition {
            Some(def) if self.hist => {
                RetvalHistogram::for_definition(def, resolved.location.clone()).map(Arc::new)
            }
            _ => None,
        };
        hists.extend(hist.clone());
        let mut probe = Probe::new(resolved.location);
        probe.trap = self.trap;
        probe.watch = resolved.definition.as_ref().and_then(|d| d.watch());
        probe.in_guest = self.jump && self.trap == TrapKind::Software && probe.watch.is_none() && {
            let stacks = self.stacks.as_ref().is_some_and(|s| s.all);
            match &resolved.definition {
                Some(def) => !stacks && probe_core::jump::in_guest_refusal(def).is_none(),
                None => !stacks,
            }
        };
        // The trampoline tests the task filter itself: hits it leaves out take no ring space.
        if probe.in_guest {
            probe.record_filter = resolved.definition.as_ref().and_then(|d| d.filter.clone());
        }
        // A return definition makes a return probe, printed or not.
        let max_active = resolved.definition.as_ref().and_then(|d| d.max_active());
        if let Some(n) = max_active {
            probe = probe.on_return(|_| Ok(())).max_active(n);
        }
        let print = self.print;
        let map = self.map.clone();
        let task = self.task.clone();
        let slide = self.slide.clone();
        let json = self.json;
        let out = self.output.clone();
        let hub = self.hub.clone();
        let streamed = event.clone();
        // The stack unwinder, when this probe's hits carry their stack.
        let stacks = self
            .stacks
            .clone()
            .filter(|s| s.all || resolved.definition.as_ref().is_some_and(|d| d.stacktrace));
        match resolved.definition {
            Some(def) if print || hist.is_some() || hub.is_some() || stacks.is_some() => {
                let handler = move |ctx: &ProbeContext<'_>| {
                    let task = task.as_deref();
                    if let Some(h) = &hist {
                        report::count_return(ctx, &def, task, h);
                    }
                    let slide = slide.load(Ordering::Relaxed);
                    let stack = match &stacks {
                        Some(s) if report::selected(ctx, &def, task) => {
                            Some(s.capture(ctx, &streamed, slide))
                        }
                        _ => None,
                    };
                    let line = |json| {
                        report::event_line(ctx, &def, &map, task, slide, json, stack.as_ref())
                    };
                    if print && let Some(mut l) = line(json) {
                        l.push('\n');
                        out.line(&l);
                    }
                    if let Some(hub) = hub.as_ref().filter(|h| h.active()) {
                        // The task filter's verdict is the same in both formats.
                        if let Some(first) = line(false) {
                            hub.publish(&streamed, &|f| match f {
                                StreamFormat::Text => format!("{first}\n"),
                                StreamFormat::Json => {
                                    format!("{}\n", line(true).unwrap_or_default())
                                }
                            });
                        }
                    }
                    Ok(())
                };
                probe = match max_active {
                    Some(_) => probe.on_return(handler),
                    None => probe.on_hit(handler),
                };
            }
            None if print || hub.is_some() || stacks.is_some() => {
                probe = probe.on_hit(move |ctx| {
                    let slide = slide.load(Ordering::Relaxed);
                    let stack = stacks.as_ref().map(|s| s.capture(ctx, &streamed, slide));
                    let text = || report::with_stack(report::hit_line(ctx), stack.as_ref());
                    if print {
                        out.line(&format!("{}\n", text()));
                    }
                    if let Some(hub) = hub.as_ref().filter(|h| h.active()) {
                        hub.publish(&streamed, &|f| match f {
                            StreamFormat::Text => format!("{}\n", text()),
                            StreamFormat::Json => {
                                format!("{}\n", report::hit_json(ctx, stack.as_ref()))
                            }
                        });
                    }
                    Ok(())
                });
            }
            _ => {}
        }
        ProbeRequest {
            probe,
            target: resolved.target,
            spec,
            event,
        }
    }
}

/// Makes the probes of live-session requests: resolved against the guest's System.map for
/// its architecture, wired as the run's own probes are.
pub struct LiveProbes {
    /// The wiring.
    pub wiring: HandlerWiring,
    /// The guest's architecture (its register names in definitions).
    pub arch: hvprobe_guest::GuestArch,
    /// `--max-probes`.
    pub max_probes: usize,
    /// What the guest's own kprobes refuse.
    pub blacklist: Arc<KprobeBlacklist>,
}

impl ProbeSource for LiveProbes {
    fn make(&self, spec: &str) -> Vec<Result<ProbeRequest, RefusedProbe>> {
        let specs = match expand_globs(&self.wiring.map, spec) {
            Ok(s) => s,
            Err(e) => return vec![Err(RefusedProbe::at_resolution(spec, e))],
        };
        specs
            .iter()
            .map(|s| {
                let resolved = resolve_probe(&self.wiring.map, s, self.arch)
                    .map_err(|e| RefusedProbe::at_resolution(s.as_str(), format!("{e:#}")))?;
                Ok(self.wiring.request(resolved, &mut Vec::new()))
            })
            .collect()
    }

    fn max_probes(&self) -> usize {
        self.max_probes
    }

    fn functions(&self, pattern: &str) -> Vec<FunctionInfo> {
        catalog::functions(&self.wiring.map, pattern, &self.blacklist).collect()
    }
}
