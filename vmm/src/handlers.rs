//! The handlers the command line gives each probe: a hit line or a kprobe_events line (text
//! or JSON), and the `--hist` count of return values, wired from the run's options. The
//! handlers themselves format through [`crate::report`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use probe_core::probe::{Probe, ProbeContext, TrapKind};
use probe_core::symbols::SymbolMap;
use probe_core::task::TaskLayout;

use crate::job::ResolvedProbe;
use crate::machine::ProbeRequest;
use crate::output::TraceOutput;
use crate::report::{self, RetvalHistogram};

/// What every probe's handlers share, from the run's options.
pub struct HandlerWiring {
    /// The trap every probe uses.
    pub trap: TrapKind,
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
}

impl HandlerWiring {
    /// The probe of `resolved` with its handlers, ready to plant; a `--hist` histogram it
    /// counts into is added to `hists`.
    pub fn request(
        &self,
        resolved: ResolvedProbe,
        hists: &mut Vec<Arc<RetvalHistogram>>,
    ) -> ProbeRequest {
        let hist = match &resolved.definition {
            Some(def) if self.hist => {
                RetvalHistogram::for_definition(def, resolved.location.clone()).map(Arc::new)
            }
            _ => None,
        };
        hists.extend(hist.clone());
        let mut probe = Probe::new(resolved.location);
        probe.trap = self.trap;
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
        match resolved.definition {
            Some(def) if print || hist.is_some() => {
                let handler = move |ctx: &ProbeContext<'_>| {
                    let task = task.as_deref();
                    if let Some(h) = &hist {
                        report::count_return(ctx, &def, task, h);
                    }
                    if print {
                        let slide = slide.load(Ordering::Relaxed);
                        report::print_event(ctx, &def, &map, task, slide, json, &out);
                    }
                    Ok(())
                };
                probe = match max_active {
                    Some(_) => probe.on_return(handler),
                    None => probe.on_hit(handler),
                };
            }
            None if print => {
                probe = probe.on_hit(move |ctx| {
                    report::print_hit(ctx, &out);
                    Ok(())
                });
            }
            _ => {}
        }
        ProbeRequest {
            probe,
            target: resolved.target,
        }
    }
}
