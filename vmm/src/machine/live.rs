//! The live-session requests ([`ApiRequest`]) as the run loop answers them: each change with
//! every vCPU paused (`ProbeSession::paused`), one request at a time (the loop is one thread).

use std::time::Instant;

use probe_core::engine::{ProbeId, ProbeStats};

use super::run_loop::RunLoop;
use super::session::ProbeSession;
use crate::api::{
    AddReply, ApiReply, ApiRequest, DetachReply, FunctionList, ProbeInfo, ProbeList, ProbeSelector,
    RemoveReply, StatsReply,
};
use crate::refusal::RefusedProbe;
use crate::summary::{ExitSummary, ProbeSummary, VcpuSummary};
use crate::vcpu::{StopReason, VcpuHandle};

impl ProbeSession {
    /// A probe's listing.
    fn info(&self, s: &ProbeStats) -> ProbeInfo {
        let (spec, event) = self
            .names
            .get(&s.id)
            .cloned()
            .unwrap_or_else(|| (s.location.clone(), s.location.clone()));
        ProbeInfo {
            id: s.id.0 as u64,
            spec,
            event,
            outstanding: s.outstanding,
            probe: ProbeSummary::new(s),
        }
    }

    /// The probes in, by id, with every hit the jump plan's trampolines recorded so far
    /// (drained now, not at the drain thread's next pass).
    pub(super) fn list(&self) -> ProbeList {
        self.engine.drain_jump_rings();
        ProbeList {
            probes: self.engine.stats().iter().map(|s| self.info(s)).collect(),
        }
    }

    /// Resolves each of `specs`, then plants them with every vCPU paused (the first change
    /// also attaches: KASLR slide, the text hash before any probe). Each is planted or
    /// refused on its own.
    pub(super) fn add(
        &mut self,
        handles: &[VcpuHandle],
        specs: &[String],
    ) -> Result<AddReply, String> {
        let mut refused = Vec::new();
        let mut requests = Vec::new();
        match &self.setup.source {
            Some(source) => {
                for spec in specs {
                    for made in source.make(spec) {
                        match made {
                            Ok(r) => requests.push(r),
                            Err(e) => refused.push(e),
                        }
                    }
                }
                if requests.len() > source.max_probes() {
                    return Err(format!(
                        "the probes expand to {} probes, more than --max-probes {}; nothing was planted",
                        requests.len(),
                        source.max_probes()
                    ));
                }
            }
            None => {
                refused.extend(specs.iter().map(|s| {
                    RefusedProbe::at_resolution(s.as_str(), "this run's probes are fixed")
                }))
            }
        }
        let planted: Vec<ProbeId> = if requests.is_empty() {
            Vec::new()
        } else {
            self.paused(handles, |s| match s.attach(handles) {
                Ok(regs) => requests
                    .into_iter()
                    .filter_map(|r| s.plant_one(r, &regs).map_err(|e| refused.push(e)).ok())
                    .collect(),
                Err(e) => {
                    refused.extend(
                        specs
                            .iter()
                            .map(|spec| RefusedProbe::at_resolution(spec.as_str(), e.to_string())),
                    );
                    Vec::new()
                }
            })
        };
        let stats = self.engine.stats();
        Ok(AddReply {
            planted: stats
                .iter()
                .filter(|s| planted.contains(&s.id))
                .map(|s| self.info(s))
                .collect(),
            refused,
        })
    }

    /// Removes the probes `which` selects, with every vCPU paused; `None` when it selects
    /// none.
    pub(super) fn remove(
        &mut self,
        handles: &[VcpuHandle],
        which: &ProbeSelector,
    ) -> Option<RemoveReply> {
        let ids: Vec<ProbeId> = self
            .engine
            .stats()
            .iter()
            .filter(|s| match which {
                ProbeSelector::Id(id) => s.id.0 as u64 == *id,
                ProbeSelector::Event(e) => self
                    .names
                    .get(&s.id)
                    .map_or(&s.location == e, |(_, event)| event == e),
                ProbeSelector::All => true,
            })
            .map(|s| s.id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        self.paused(handles, |s| {
            // Hits recorded before the removal are reported.
            s.engine.drain_jump_rings();
            for id in &ids {
                if let Ok(Some(r)) = s.engine.remove(*id) {
                    s.report.rewritten.push(r);
                }
                s.names.remove(id);
            }
        });
        Some(RemoveReply {
            removed: ids.iter().map(|id| id.0 as u64).collect(),
        })
    }

    /// Removes every probe and hashes the kernel text against its hash before the first
    /// probe; the VM keeps running.
    pub(super) fn detach(&mut self, handles: &[VcpuHandle]) -> DetachReply {
        let removed = self.engine.stats().len();
        let (after, changed) = self.paused(handles, |s| {
            s.engine.drain_jump_rings();
            s.report.rewritten.extend(s.engine.remove_all());
            s.names.clear();
            s.regs.clone().map_or((None, None), |r| s.text_after(&r))
        });
        DetachReply {
            removed,
            text_before: self.text_before,
            text_after: after,
            restored: super::session::text_restored(self.text_before, after, changed),
        }
    }

    /// Exit counts, per vCPU, pauses (the jump plan's records drained first, as for
    /// [`ProbeSession::list`]).
    pub(super) fn stats(&self, started: Instant) -> StatsReply {
        self.engine.drain_jump_rings();
        let vcpus = self
            .vcpus
            .iter()
            .map(|c| {
                let (debug_exits, site_hits, handed_back) = c.snapshot();
                VcpuSummary {
                    debug_exits,
                    site_hits,
                    handed_back,
                }
            })
            .collect();
        StatsReply {
            uptime_s: started.elapsed().as_secs_f64(),
            probes: self.engine.stats().len(),
            exits: ExitSummary::new(
                &self.engine.exit_stats(),
                self.register_ioctls.counts(),
                self.device_writes_refused(),
            ),
            vcpus,
            changes: self.pauses.changes,
            longest_pause_us: self.pauses.longest.as_micros() as u64,
            last_pause_us: self.pauses.last.as_micros() as u64,
            returns_outstanding: self.engine.live_returns(),
        }
    }
}

impl RunLoop {
    /// The answer to a live-session request.
    pub(super) fn answer(&mut self, request: ApiRequest) -> ApiReply {
        if request == ApiRequest::Stop {
            self.stop.stop(StopReason::Requested);
            return ApiReply::ok(&serde_json::json!({ "stopping": true }));
        }
        let Some(session) = &mut self.session else {
            return ApiReply::error(
                409,
                "this run has no probing (the guest kernel's System.map is needed)",
            );
        };
        match request {
            ApiRequest::ListProbes => ApiReply::ok(&session.list()),
            ApiRequest::Functions(pattern) => match &session.setup.source {
                Some(source) => ApiReply::ok(&FunctionList {
                    functions: source.functions(&pattern),
                }),
                None => ApiReply::error(409, "this run's probes are fixed"),
            },
            ApiRequest::AddProbes(specs) => {
                let reply = match session.add(&self.handles, &specs) {
                    Ok(r) => r,
                    Err(e) => return ApiReply::error(400, e),
                };
                // Probes are in: the console keeps the guest's fault reports from now on.
                if !reply.planted.is_empty() {
                    self.console
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .probes_in = true;
                }
                let status = if reply.planted.is_empty() { 422 } else { 200 };
                ApiReply::with_status(status, &reply)
            }
            ApiRequest::RemoveProbes(which) => match session.remove(&self.handles, &which) {
                Some(reply) => ApiReply::ok(&reply),
                None => ApiReply::error(
                    404,
                    match which {
                        ProbeSelector::Id(id) => format!("no probe with id {id}"),
                        ProbeSelector::Event(e) => format!("no probe of event {e}"),
                        ProbeSelector::All => "no probes are in".to_string(),
                    },
                ),
            },
            ApiRequest::Stats => ApiReply::ok(&session.stats(self.started)),
            ApiRequest::Detach => ApiReply::ok(&session.detach(&self.handles)),
            ApiRequest::Integrity => match session.integrity_now(&self.handles) {
                Ok(r) => ApiReply::ok(&crate::summary::IntegritySummary::new(&r)),
                Err(e) => ApiReply::error(409, e),
            },
            ApiRequest::Stop => unreachable!("answered above"),
        }
    }
}
