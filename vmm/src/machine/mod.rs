//! Running a VM to its end: the vCPU threads, and on the main thread a run loop
//! (`run_loop.rs`) that handles [`Command`]s (`commands.rs`) queued by the event sources
//! (`events.rs`: console input, stop requests, signals, the guest's `/init`), probing
//! (`session.rs`), and how the run ended (`outcome.rs`).

mod commands;
mod events;
mod live;
mod outcome;
mod run_loop;
mod session;

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::api::events::EventHub;
use crate::api::http::ApiContext;
use crate::output::{ConsoleSink, TraceOutput};
use crate::vcpu::{self, StopReason, StopSignal, VcpuContext, VcpuHandle};
use crate::vm::{Vm, VmConfig, VmError};
pub use commands::{Command, CommandSender};
use commands::{CommandQueue, CommandSource};
use events::{INTERRUPT_FD, StdinRelay, interrupt_handler};
pub use outcome::{EXIT_GUEST_FAILED, EXIT_PROBE_REFUSED, Outcome, RunReport};
use run_loop::RunLoop;
use session::ProbeSession;
pub use session::{
    IntegrityRegions, IntegrityReport, JumpSetup, PlantingError, ProbeReport, ProbeRequest,
    ProbeSetup, ProbeSource, ProtectExemption, TextChanges, TextHashes, text_restored,
};

/// Errors that keep a VM from running at all (as opposed to a guest that ends badly, which is
/// an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Building the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// An eventfd, a signal handler, a thread or the event loop could not be set up.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The event loop could not be set up.
    #[error("event manager: {0}")]
    EventManager(#[from] event_manager::Error),
    /// The jump plan's rings could not be set up.
    #[error("the jump plan's rings: {0}")]
    Jump(String),
    /// The XOL area could not be laid out or its tables written.
    #[error("XOL area: {0}")]
    XolArea(#[from] probe_core::xol::XolError),
}

/// A set-up step's error, as a [`MachineError`] naming the step.
fn setup_err<E: Into<SetupSource>>(what: &'static str) -> impl FnOnce(E) -> MachineError {
    move |e| MachineError::Setup {
        what,
        source: e.into().0,
    }
}

/// An I/O error or an errno, for [`setup_err`].
struct SetupSource(std::io::Error);

impl From<std::io::Error> for SetupSource {
    fn from(e: std::io::Error) -> SetupSource {
        SetupSource(e)
    }
}

impl From<vmm_sys_util::errno::Error> for SetupSource {
    fn from(e: vmm_sys_util::errno::Error) -> SetupSource {
        SetupSource(std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// What to run and for how long.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The VM to build.
    pub vm: VmConfig,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// Relay this process's stdin to the guest console.
    pub forward_stdin: bool,
    /// The guest kernel's System.map, if known: names where the vCPUs were when the run
    /// ends at its time limit.
    pub system_map: Option<std::path::PathBuf>,
}

/// The live-session API of a run (`--api-socket`): its bound socket and event streams.
pub struct ApiSetup {
    /// The bound socket.
    pub listener: std::os::unix::net::UnixListener,
    /// Its path, removed at the end of the run.
    pub path: std::path::PathBuf,
    /// The event streams the probes' handlers publish to.
    pub hub: Arc<EventHub>,
    /// Inside the emulated runner's L1: the port that carries the host's connections.
    pub mux_port: Option<std::path::PathBuf>,
}

/// Starts serving `api`, its requests queued for the loop through `commands`.
fn serve_api(api: &ApiSetup, commands: CommandSender) -> Result<(), MachineError> {
    let ctx = Arc::new(ApiContext {
        commands,
        hub: api.hub.clone(),
        version: crate::cli::VERSION.to_string(),
        arch: <crate::arch::Host as crate::arch::VmmArch>::ARCH.to_string(),
    });
    let listener = api.listener.try_clone().map_err(setup_err("API socket"))?;
    crate::api::http::serve(listener, ctx).map_err(setup_err("API thread"))?;
    if let Some(port) = &api.mux_port {
        // A virtio port opens once: one descriptor, duplicated for the other direction.
        let rx =
            crate::l1init::open_port(&port.to_string_lossy()).map_err(setup_err("API port"))?;
        let tx = rx.try_clone().map_err(setup_err("API port"))?;
        let path = api.path.clone();
        crate::api::mux::serve_guest(rx, tx, move || {
            std::os::unix::net::UnixStream::connect(&path)
        });
    }
    Ok(())
}

/// An eventfd for the run's own wake-ups.
fn eventfd() -> Result<EventFd, MachineError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(setup_err("eventfd"))
}

/// Boots the VM described by `opts` on `kvm`, relays its console to stdout (sharing it with
/// `output` when trace lines go there too), and returns once the guest has ended.
pub fn run(
    kvm: Kvm,
    opts: &RunOptions,
    probes: Option<ProbeSetup>,
    api: Option<ApiSetup>,
    output: Arc<TraceOutput>,
) -> Result<RunReport, MachineError> {
    let mut vm = Vm::new(kvm, &opts.vm, Box::new(ConsoleSink(output.clone())))?;
    let session = probes
        .map(|setup| ProbeSession::new(setup, &vm))
        .transpose()?;
    let probing = session.as_ref().map(ProbeSession::probing);
    let sync_regs = vm
        .kvm
        .check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS.into())
        > 0;
    let stop = Arc::new(StopSignal::new().map_err(setup_err("eventfd"))?);
    vcpu::install_kick_handler().map_err(setup_err("kick signal handler"))?;

    // Every event source of the run queues a command for the loop.
    let queue = CommandQueue::new().map_err(setup_err("eventfd"))?;
    let mut em: run_loop::Events = EventManager::new()?;
    em.add_subscriber(Box::new(queue.waker().map_err(setup_err("eventfd"))?));
    let stop_reason = stop.clone();
    em.add_subscriber(Box::new(CommandSource::new(
        stop.evt.try_clone().map_err(setup_err("eventfd"))?,
        &queue,
        move || stop_reason.reason().map(Command::Stop),
    )));
    em.add_subscriber(Box::new(CommandSource::new(
        vm.reset_evt.try_clone().map_err(setup_err("eventfd"))?,
        &queue,
        || Some(Command::Stop(StopReason::GuestReset)),
    )));
    // SIGINT/SIGTERM end the run cleanly, through the same stop path as the guest.
    let interrupted = eventfd()?;
    INTERRUPT_FD.store(interrupted.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, interrupt_handler)
            .map_err(setup_err("signal handler"))?;
    }
    em.add_subscriber(Box::new(CommandSource::new(interrupted, &queue, || {
        Some(Command::Stop(StopReason::Interrupted))
    })));
    let init_ready = eventfd()?;
    vm.console
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .init_ready_evt = Some(init_ready.try_clone().map_err(setup_err("eventfd"))?);
    em.add_subscriber(Box::new(CommandSource::new(init_ready, &queue, || {
        Some(Command::InitReady)
    })));
    let output_wake = eventfd()?;
    output.set_wake(output_wake.try_clone().map_err(setup_err("eventfd"))?);
    em.add_subscriber(Box::new(CommandSource::new(output_wake, &queue, || {
        Some(Command::Reschedule)
    })));
    if opts.forward_stdin {
        let drained = vm
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_drained()
            .map_err(setup_err("eventfd"))?;
        em.add_subscriber(Box::new(StdinRelay::new(vm.serial.clone(), drained)));
    }

    if let Some(api) = &api {
        serve_api(api, queue.sender())?;
    }

    let started = Instant::now();
    let mut handles: Vec<VcpuHandle> = Vec::new();
    for (id, fd) in vm.vcpus.drain(..).enumerate() {
        let ctx = VcpuContext {
            pio: vm.pio.clone(),
            mmio: vm.mmio.clone(),
            stop: stop.clone(),
            probing: probing.clone(),
            sync_regs,
        };
        let handle = vcpu::spawn(id as u32, fd, ctx).map_err(setup_err("vCPU thread"))?;
        handles.push(handle);
    }

    let mut run = RunLoop {
        queue,
        stop: stop.clone(),
        session,
        handles,
        output: output.clone(),
        time_limit: opts.timeout.map(|t| started + t),
        started,
        serial: vm.serial.clone(),
        console: vm.console.clone(),
        probe_refused: None,
    };
    run.run(&mut em);
    let RunLoop {
        session,
        handles,
        probe_refused,
        ..
    } = run;
    if stop.reason() == Some(StopReason::Timeout) {
        let map = opts.system_map.as_deref().and_then(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            probe_core::symbols::SymbolMap::parse(&text).ok()
        });
        for line in session::whereabouts(&handles, map.as_ref()) {
            eprintln!("hvprobe: at the time limit, {line}");
        }
    }
    let probe_report = session.map(|s| s.finish(&handles, &vm.console));
    if let Some(api) = &api {
        // Streams end; the socket goes (requests from now on find nobody).
        api.hub.close();
        let _ = std::fs::remove_file(&api.path);
    }
    INTERRUPT_FD.store(-1, Ordering::SeqCst);
    let run_time = started.elapsed();
    for h in handles {
        h.stop_and_join();
    }
    output.flush();
    let _ = io::stdout().flush();

    let console = vm.console.lock().unwrap_or_else(|e| e.into_inner());
    let reason = stop.reason().unwrap_or(StopReason::GuestReset);
    Ok(RunReport {
        outcome: Outcome::of(reason, probe_refused, opts.timeout, &console),
        boot_to_init: console
            .init_ready_at
            .map(|t| t.saturating_duration_since(started)),
        boot_to_autorun: console
            .autorun_at
            .map(|t| t.saturating_duration_since(started)),
        run_time,
        console_tail: console.tail.iter().cloned().collect(),
        faults_with_probes: console.faults_with_probes.clone(),
        probes: probe_report,
    })
}
