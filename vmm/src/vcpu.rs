//! The vCPU thread: one per vCPU, running `KVM_RUN` as an explicit state machine
//! (running, paused, exited) driven by commands from the VMM's main thread.
//!
//! A command is delivered by sending it on the vCPU's channel and then kicking the thread with
//! a real-time signal whose handler sets `immediate_exit` in the thread's `kvm_run` page, so the
//! vCPU leaves `KVM_RUN` (or never enters it) and looks at its channel. This is race-free: a
//! kick that lands between the channel check and `KVM_RUN` makes `KVM_RUN` return `EINTR` at
//! once.

use crate::arch::VmmArch;
use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::devices::{MmioBus, PioBus};
use crate::probing::{DebugExitHook, NoProbes, PausedState, Probing, VcpuProbing};

/// Why the machine is stopping, as first reported by a vCPU, a device or the main loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset itself (i8042 reset, triple fault, `KVM_EXIT_SHUTDOWN`).
    GuestReset,
    /// The guest asked to power off (`KVM_EXIT_SYSTEM_EVENT`) or halted with nothing to wake it.
    GuestPoweroff,
    /// A vCPU hit an error KVM cannot continue from.
    VcpuError(String),
    /// The run's time limit passed.
    Timeout,
    /// The user interrupted hvprobe (SIGINT, SIGTERM).
    Interrupted,
    /// A client of the live-session API asked for the VM to stop.
    Requested,
}

/// Collects the first [`StopReason`] and wakes the main loop through an `EventFd`.
pub struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    /// Readable once a reason is set.
    pub evt: EventFd,
}

impl StopSignal {
    /// A signal with no reason set yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is recorded already, and wakes the main loop.
    pub fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Commands the main thread sends to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave `KVM_RUN` and wait; answered with [`VcpuEvent::Paused`].
    Pause,
    /// Go back into `KVM_RUN`; answered with [`VcpuEvent::Resumed`].
    Resume,
    /// Leave for good; answered with [`VcpuEvent::Exited`].
    Stop,
    /// While paused: report the registers; answered with [`VcpuEvent::Registers`].
    ReadRegisters,
}

/// What a vCPU thread reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The vCPU is out of `KVM_RUN` and waits for a command.
    Paused,
    /// The vCPU runs again.
    Resumed,
    /// The thread ends.
    Exited,
    /// The registers, or why they could not be read.
    Registers(Result<Box<PausedState>, String>),
    /// The command is not one the vCPU takes in its present state (nothing was done).
    Refused {
        /// The command.
        command: VcpuCommand,
        /// The state it was refused in.
        state: &'static str,
    },
}

/// The vCPU thread's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VcpuState {
    Running,
    Paused,
    Exited,
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PAGE.with(|page| {
        let run = page.get();
        if !run.is_null() {
            // SAFETY: the pointer is the calling thread's own `kvm_run` mapping, set by the vCPU
            // thread before it first enters KVM_RUN and cleared before the VcpuFd is dropped;
            // a volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), kick_handler)
}

/// Handle on a running vCPU thread.
pub struct VcpuHandle {
    /// The vCPU index.
    pub id: u32,
    commands: Sender<VcpuCommand>,
    events: Receiver<VcpuEvent>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `cmd` and kicks the thread so it sees it now.
    pub fn send(&self, cmd: VcpuCommand) {
        if self.commands.send(cmd).is_ok()
            && let Some(t) = &self.thread
        {
            let _ = t.kill(kick_signal());
        }
    }

    /// Waits for the thread's next report.
    pub fn wait_event(&self) -> Option<VcpuEvent> {
        self.events.recv().ok()
    }

    /// Stops the thread and joins it.
    pub fn stop_and_join(mut self) {
        self.send(VcpuCommand::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a vCPU thread needs from the machine.
pub struct VcpuContext {
    /// Port-I/O devices.
    pub pio: PioBus,
    /// MMIO devices (none on x86 today; arm64's UART goes here).
    pub mmio: MmioBus,
    /// Where to report that the machine must stop.
    pub stop: Arc<StopSignal>,
    /// The probe engine, when the run probes the guest.
    pub probing: Option<Arc<Probing>>,
    /// Whether KVM offers `KVM_CAP_SYNC_REGS`.
    pub sync_regs: bool,
}

struct VcpuThread {
    id: u32,
    fd: VcpuFd,
    ctx: VcpuContext,
    commands: Receiver<VcpuCommand>,
    events: Sender<VcpuEvent>,
    state: VcpuState,
    /// Whoever watches debug exits (the prober, or [`NoProbes`]).
    debug: Box<dyn DebugExitHook>,
}

/// What one `KVM_RUN` exit means for the state machine.
enum ExitAction {
    Continue,
    Stop(StopReason),
    /// An MMIO write (address, data, length): a protected page's or a device's.
    MmioWrite(u64, [u8; 8], usize),
    /// An exit kvm-ioctls does not decode (its reason), for the architecture.
    Other(u32),
}

impl VcpuThread {
    fn answer(&self, event: VcpuEvent) {
        let _ = self.events.send(event);
    }

    /// A command while running: pause or stop; reading registers needs a paused vCPU, and a
    /// running vCPU has nothing to resume (refused, nothing done).
    fn command_while_running(&mut self, cmd: VcpuCommand) {
        match cmd {
            VcpuCommand::Pause => {
                self.state = VcpuState::Paused;
                self.answer(VcpuEvent::Paused);
            }
            VcpuCommand::Stop => {
                self.state = VcpuState::Exited;
                self.answer(VcpuEvent::Exited);
            }
            VcpuCommand::Resume | VcpuCommand::ReadRegisters => self.answer(VcpuEvent::Refused {
                command: cmd,
                state: "running",
            }),
        }
    }

    /// A command while paused: resume, stop, read the registers; pausing again is answered as
    /// done (a vCPU that stopped itself is paused when the machine pauses everyone).
    fn command_while_paused(&mut self, cmd: VcpuCommand) {
        match cmd {
            VcpuCommand::Pause => self.answer(VcpuEvent::Paused),
            VcpuCommand::Resume => {
                self.state = VcpuState::Running;
                self.answer(VcpuEvent::Resumed);
            }
            VcpuCommand::Stop => {
                self.state = VcpuState::Exited;
                self.answer(VcpuEvent::Exited);
            }
            VcpuCommand::ReadRegisters => {
                let state = VcpuProbing::paused_state(&mut self.fd)
                    .map(Box::new)
                    .map_err(|e| e.to_string());
                self.answer(VcpuEvent::Registers(state));
            }
        }
    }

    /// The running state: a pending command first, else one `KVM_RUN`; an exit that stops the
    /// machine reports its reason and leaves the vCPU paused for the main thread's `Stop`.
    fn running(&mut self) {
        if let Ok(cmd) = self.commands.try_recv() {
            self.command_while_running(cmd);
            return;
        }
        if let ExitAction::Stop(reason) = self.run_once() {
            self.ctx.stop.stop(reason);
            self.state = VcpuState::Paused;
        }
    }

    /// The paused state: out of `KVM_RUN` until a command comes (or the machine is gone).
    fn paused(&mut self) {
        match self.commands.recv() {
            Ok(cmd) => self.command_while_paused(cmd),
            Err(_) => self.state = VcpuState::Exited,
        }
    }

    fn run_once(&mut self) -> ExitAction {
        match self.enter() {
            ExitAction::MmioWrite(addr, bytes, len) => {
                let data = &bytes[..len];
                match self.debug.on_mmio_write(self.id, &mut self.fd, addr, data) {
                    Ok(true) => ExitAction::Continue,
                    Ok(false) => {
                        self.ctx.mmio.write(addr, data);
                        ExitAction::Continue
                    }
                    Err(e) => {
                        ExitAction::Stop(StopReason::VcpuError(format!("vCPU {}: {e}", self.id)))
                    }
                }
            }
            ExitAction::Other(reason) => {
                match self.debug.on_other_exit(self.id, &mut self.fd, reason) {
                    Ok(true) => ExitAction::Continue,
                    Ok(false) => ExitAction::Stop(StopReason::VcpuError(format!(
                        "vCPU {}: unexpected exit reason {reason}",
                        self.id
                    ))),
                    Err(e) => {
                        ExitAction::Stop(StopReason::VcpuError(format!("vCPU {}: {e}", self.id)))
                    }
                }
            }
            other => other,
        }
    }

    /// One `KVM_RUN` and what its exit asks for.
    fn enter(&mut self) -> ExitAction {
        if let Err(e) = self.debug.before_run(&mut self.fd) {
            return ExitAction::Stop(StopReason::VcpuError(format!("vCPU {}: {e}", self.id)));
        }
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.ctx.pio.read(u64::from(port), data);
                    ExitAction::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    self.ctx.pio.write(u64::from(port), data);
                    ExitAction::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.ctx.mmio.read(addr, data);
                    ExitAction::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    // Handled once the exit's borrow of the vCPU ends.
                    let mut bytes = [0u8; 8];
                    let len = data.len().min(8);
                    bytes[..len].copy_from_slice(&data[..len]);
                    ExitAction::MmioWrite(addr, bytes, len)
                }
                VcpuExit::Debug(arch) => {
                    match self.debug.on_debug_exit(self.id, &mut self.fd, &arch) {
                        Ok(()) => ExitAction::Continue,
                        Err(e) => ExitAction::Stop(StopReason::VcpuError(format!(
                            "vCPU {}: {e}",
                            self.id
                        ))),
                    }
                }
                VcpuExit::Shutdown => ExitAction::Stop(StopReason::GuestReset),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                        ExitAction::Stop(StopReason::GuestReset)
                    }
                    _ => ExitAction::Stop(StopReason::GuestPoweroff),
                },
                VcpuExit::Hlt => ExitAction::Stop(StopReason::GuestPoweroff),
                VcpuExit::FailEntry(reason, cpu) => {
                    ExitAction::Stop(StopReason::VcpuError(format!(
                        "vCPU {}: KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on CPU {cpu}",
                        self.id
                    )))
                }
                VcpuExit::InternalError => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: KVM filled the `internal` member of the exit union for
                    // KVM_EXIT_INTERNAL_ERROR.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let data = &internal.data[..(internal.ndata as usize).min(internal.data.len())];
                    let pc = crate::arch::Host::read_pc(&self.fd).unwrap_or(0);
                    ExitAction::Stop(StopReason::VcpuError(format!(
                        "vCPU {}: KVM_EXIT_INTERNAL_ERROR, suberror {}, pc {pc:#x}, data {data:x?}",
                        self.id, internal.suberror
                    )))
                }
                VcpuExit::Unsupported(reason) => ExitAction::Other(reason),
                other => ExitAction::Stop(StopReason::VcpuError(format!(
                    "vCPU {}: unexpected exit {other:?}",
                    self.id
                ))),
            },
            Err(e) if e.errno() == libc::EINTR => {
                self.fd.set_kvm_immediate_exit(0);
                ExitAction::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => ExitAction::Continue,
            Err(e) => ExitAction::Stop(StopReason::VcpuError(format!(
                "vCPU {}: KVM_RUN: {e}",
                self.id
            ))),
        }
    }

    fn main_loop(&mut self) {
        let run_page: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PAGE.with(|p| p.set(run_page));
        loop {
            match self.state {
                VcpuState::Running => self.running(),
                VcpuState::Paused => self.paused(),
                VcpuState::Exited => break,
            }
        }
        KVM_RUN_PAGE.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Starts a thread running vCPU `id`.
pub fn spawn(id: u32, mut fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    let (cmd_tx, cmd_rx) = channel();
    let (evt_tx, evt_rx) = channel();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let debug: Box<dyn DebugExitHook> = match ctx.probing.clone() {
                Some(p) => Box::new(VcpuProbing::new(p, &mut fd, ctx.sync_regs)),
                None => Box::new(NoProbes),
            };
            let mut t = VcpuThread {
                debug,
                id,
                fd,
                ctx,
                commands: cmd_rx,
                events: evt_tx,
                state: VcpuState::Running,
            };
            t.main_loop();
        })?;
    Ok(VcpuHandle {
        id,
        commands: cmd_tx,
        events: evt_rx,
        thread: Some(thread),
    })
}
