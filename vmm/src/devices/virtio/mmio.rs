//! The virtio-mmio transport (virtio 1.2, section 4.2.2; version 2 registers only): what the
//! guest's `virtio_mmio` driver reads and writes, the device status handshake, the one
//! queue's programming, and the hand-over of that queue to the device (its backend) once the
//! driver says DRIVER_OK. The backend does the device's work off the vCPU threads; this side
//! only answers register accesses, which are quick.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, VirtioIrq};
use crate::devices::BusDevice;

/// "virt", little-endian: what `virtio_mmio_probe` checks first.
pub const MAGIC: u32 = 0x7472_6976;
/// The bytes of guest-physical space one device takes (Firecracker's `MMIO_LEN`): a page,
/// so each device's registers are alone on theirs.
pub const MMIO_LEN: u64 = 0x1000;
/// The register the driver writes a queue's index to when it has posted buffers; the VMM
/// registers an ioeventfd there so that a notification never exits to user space.
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// What a device behind the transport does: say what it is and offers, answer config
/// reads, and run its queue from DRIVER_OK until reset.
pub trait VirtioBackend: Send {
    /// The virtio device ID (2 for a block device).
    fn device_type(&self) -> u32;
    /// The feature bits offered.
    fn features(&self) -> u64;
    /// The most entries its one queue may have.
    fn queue_max_size(&self) -> u16;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts serving the queue: the driver has negotiated and set it up.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving (the driver reset the device or the VM ends); waits until it has.
    fn reset(&mut self);
}

/// What a backend gets at DRIVER_OK.
pub struct Activation {
    /// The guest's memory (the same mappings the vCPUs use).
    pub memory: GuestMemoryMmap,
    /// The queue as the driver programmed it.
    pub queue: Queue,
    /// Written when the driver notifies the queue (an ioeventfd, or the transport itself).
    pub notify: EventFd,
    /// How to interrupt the guest.
    pub irq: VirtioIrq,
    /// The features the driver accepted.
    pub features: u64,
}

/// The queue as the driver programs it, checked only when it says DRIVER_OK (the driver
/// writes addresses in halves, so a half-written one is no error).
#[derive(Debug, Default, Clone, Copy)]
struct QueueConfig {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

/// One virtio-mmio device: its registers and the backend behind them.
pub struct MmioTransport {
    backend: Box<dyn VirtioBackend>,
    memory: GuestMemoryMmap,
    queue: QueueConfig,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked: u64,
    status: u32,
    active: bool,
    irq: VirtioIrq,
    notify: EventFd,
}

impl MmioTransport {
    /// A transport for `backend`, over `memory`, interrupting through `irq`.
    pub fn new(
        backend: Box<dyn VirtioBackend>,
        memory: GuestMemoryMmap,
        irq: VirtioIrq,
    ) -> Result<MmioTransport, ActivateError> {
        Ok(MmioTransport {
            queue: QueueConfig {
                size: backend.queue_max_size(),
                ..QueueConfig::default()
            },
            backend,
            memory,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked: 0,
            status: 0,
            active: false,
            irq,
            notify: EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::EventFd)?,
        })
    }

    /// The queue's notification eventfd, for the VMM to register as an ioeventfd at
    /// `base + NOTIFY_OFFSET` (datamatch 0).
    pub fn notify_event(&self) -> &EventFd {
        &self.notify
    }

    /// The device status the driver has set (and the device's NEEDS_RESET).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether queue registers may change now: after FEATURES_OK, before DRIVER_OK.
    fn queue_writable(&self) -> bool {
        self.queue_select == 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.active {
            self.backend.reset();
            self.active = false;
        }
        self.queue = QueueConfig {
            size: self.backend.queue_max_size(),
            ..QueueConfig::default()
        };
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked = 0;
        self.status = 0;
        self.irq.status.store(0, Ordering::SeqCst);
        // A notification left over from before the reset means nothing now.
        let _ = self.notify.read();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only adds bits (virtio 1.2, 3.1.1); anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        let mut value = value;
        let new = value & !self.status;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.backend.features();
            if self.acked & !offered != 0 || self.acked & (1 << VIRTIO_F_VERSION_1) == 0 {
                // The driver reads the status back and gives up (`virtio_features_ok`).
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            value = self.activate(value);
        }
        self.status = value;
    }

    /// DRIVER_OK: hands the queue to the backend, or sets NEEDS_RESET if it cannot run.
    fn activate(&mut self, value: u32) -> u32 {
        let needs_reset = value | VIRTIO_CONFIG_S_NEEDS_RESET;
        if value & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return needs_reset;
        }
        let Some(queue) = self.queue() else {
            return needs_reset;
        };
        let activation = (|| {
            Ok(Activation {
                memory: self.memory.clone(),
                queue,
                notify: self.notify.try_clone().map_err(ActivateError::EventFd)?,
                irq: self.irq.clone(),
                features: self.acked,
            })
        })()
        .and_then(|a| self.backend.activate(a));
        match activation {
            Ok(()) => {
                self.active = true;
                value
            }
            Err(e) => {
                eprintln!(
                    "hvprobe: virtio device type {}: {e}",
                    self.backend.device_type()
                );
                needs_reset
            }
        }
    }

    /// The queue the driver programmed, if it is one: ready, a power-of-two size within the
    /// maximum, aligned rings inside guest memory.
    fn queue(&self) -> Option<Queue> {
        let c = self.queue;
        let mut q = Queue::new(self.backend.queue_max_size()).ok()?;
        q.try_set_size(c.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(c.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(c.avail)).ok()?;
        q.try_set_used_ring_address(GuestAddress(c.used)).ok()?;
        q.set_ready(c.ready);
        q.set_event_idx(self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        (c.ready && q.is_valid(&self.memory)).then_some(q)
    }

    fn register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.backend.device_type(),
            VIRTIO_MMIO_VENDOR_ID => 0,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.backend.features() as u32,
                1 => (self.backend.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX if self.queue_select == 0 => {
                u32::from(self.backend.queue_max_size())
            }
            VIRTIO_MMIO_QUEUE_READY if self.queue_select == 0 => u32::from(self.queue.ready),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.irq.status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            // The configuration never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn set_register(&mut self, offset: u32, v: u32) {
        let q = self.queue_writable();
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES
                if self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 =>
            {
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                set_half(&mut self.acked, shift, v);
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            // A size beyond 16 bits is no size: leave 0, which the check at DRIVER_OK refuses.
            VIRTIO_MMIO_QUEUE_NUM if q => self.queue.size = u16::try_from(v).unwrap_or(0),
            VIRTIO_MMIO_QUEUE_READY if q => self.queue.ready = v == 1,
            VIRTIO_MMIO_QUEUE_DESC_LOW if q => set_half(&mut self.queue.desc, 0, v),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if q => set_half(&mut self.queue.desc, 32, v),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if q => set_half(&mut self.queue.avail, 0, v),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if q => set_half(&mut self.queue.avail, 32, v),
            VIRTIO_MMIO_QUEUE_USED_LOW if q => set_half(&mut self.queue.used, 0, v),
            VIRTIO_MMIO_QUEUE_USED_HIGH if q => set_half(&mut self.queue.used, 32, v),
            VIRTIO_MMIO_QUEUE_NOTIFY if v == 0 => {
                // Where no ioeventfd catches the write (or before the VMM registered one).
                let _ = self.notify.write(1);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.irq.status.fetch_and(!v, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(v),
            // Legacy (version 1) and shared-memory registers, and writes out of turn.
            _ => {}
        }
    }
}

/// Sets the 32 bits of `value` at `shift` (0 or 32) to `half`.
fn set_half(value: &mut u64, shift: u32, half: u32) {
    *value = (*value & !(0xffff_ffff << shift)) | (u64::from(half) << shift);
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.backend
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32 bits wide and read whole (the driver's readl).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.register(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Configuration writes (none of the fields offered is writable) and partial register
        // writes are dropped.
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) || !offset.is_multiple_of(4) {
            return;
        }
        self.set_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.active {
            self.backend.reset();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_FAILED};

    use super::*;

    /// What a fake backend was asked to do.
    #[derive(Default)]
    pub(crate) struct Calls {
        activations: Vec<(u64, u16, bool)>,
        resets: usize,
    }

    struct FakeBackend(Arc<Mutex<Calls>>);

    impl VirtioBackend for FakeBackend {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << 9 | 1 << VIRTIO_RING_F_EVENT_IDX
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config: Vec<u8> = (0u8..24).collect();
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activations.push((
                a.features,
                a.queue.size(),
                a.queue.event_idx_enabled(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    pub(crate) fn read(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn write(t: &mut MmioTransport, offset: u32, v: u32) {
        t.write(u64::from(offset), &v.to_le_bytes());
    }

    /// The driver's side of `virtio_mmio_probe`, `virtio_dev_probe` and `vm_setup_vq`: the
    /// status handshake, the features `acked`, one queue of `size` entries at `desc`, `avail`
    /// and `used`.
    pub(crate) fn bring_up(
        t: &mut MmioTransport,
        acked: u64,
        size: u16,
        (desc, avail, used): (u64, u64, u64),
    ) {
        write(t, VIRTIO_MMIO_STATUS, 0);
        write(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        write(t, VIRTIO_MMIO_STATUS, s);
        for sel in 0..2 {
            write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            write(t, VIRTIO_MMIO_DRIVER_FEATURES, (acked >> (32 * sel)) as u32);
        }
        write(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_ne!(read(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read(t, VIRTIO_MMIO_QUEUE_READY), 0);
        write(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        for (lo, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, used),
        ] {
            write(t, lo, addr as u32);
            write(t, lo + 4, (addr >> 32) as u32);
        }
        write(t, VIRTIO_MMIO_QUEUE_READY, 1);
        write(
            t,
            VIRTIO_MMIO_STATUS,
            s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Calls>>, VirtioIrq) {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let irq = VirtioIrq::new().unwrap();
        let t = MmioTransport::new(Box::new(FakeBackend(calls.clone())), memory(), irq.clone())
            .unwrap();
        (t, calls, irq)
    }

    const RINGS: (u64, u64, u64) = (0x1000, 0x2000, 0x3000);
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn the_identity_registers_read_as_virtio_mmio_probe_expects() {
        let (mut t, _, _) = transport();
        assert_eq!(read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(read(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(read(&mut t, VIRTIO_MMIO_VENDOR_ID), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        // Only queue 0 exists.
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        // Feature pages by select.
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            1 << 9 | 1 << VIRTIO_RING_F_EVENT_IDX
        );
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        // Byte and half-word register reads are not registers; config reads any width.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        let mut c = [0u8; 3];
        t.read(0x100 + 5, &mut c);
        assert_eq!(c, [5, 6, 7]);
        let mut d = [0xffu8; 2];
        t.read(0x100 + 23, &mut d);
        assert_eq!(d, [23, 0]);
    }

    #[test]
    fn the_handshake_activates_once_with_the_queue_and_features_the_driver_set() {
        let (mut t, calls, _) = transport();
        let acked = VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        bring_up(&mut t, acked, 128, RINGS);
        assert_eq!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(calls.lock().unwrap().activations, vec![(acked, 128, true)]);
        // After DRIVER_OK the queue cannot be reprogrammed, features cannot change, and a
        // repeated DRIVER_OK does not activate again.
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 64);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        let s = t.status();
        write(&mut t, VIRTIO_MMIO_STATUS, s);
        assert_eq!(calls.lock().unwrap().activations.len(), 1);
        // Clearing bits other than by a reset is ignored.
        write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(t.status(), s);
        // Reset stops the backend and forgets everything; a second bring-up works.
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(calls.lock().unwrap().resets, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        bring_up(&mut t, VERSION_1, 256, RINGS);
        assert_eq!(
            calls.lock().unwrap().activations[1],
            (VERSION_1, 256, false)
        );
        drop(t);
        assert_eq!(calls.lock().unwrap().resets, 2, "dropping stops it too");
    }

    #[test]
    fn features_ok_needs_version_1_and_nothing_not_offered() {
        let (mut t, calls, _) = transport();
        for bad in [0, 1 << 9, VERSION_1 | 1 << 40] {
            write(&mut t, VIRTIO_MMIO_STATUS, 0);
            let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
            write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            write(&mut t, VIRTIO_MMIO_STATUS, s);
            for sel in 0..2 {
                write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                write(
                    &mut t,
                    VIRTIO_MMIO_DRIVER_FEATURES,
                    (bad >> (32 * sel)) as u32,
                );
            }
            write(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
            assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), s, "{bad:#x}");
            // The queue cannot be set up without FEATURES_OK, and DRIVER_OK then fails.
            write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
            write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
            assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
            write(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
            assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        }
        assert!(calls.lock().unwrap().activations.is_empty());
        // FAILED from the driver is kept; nothing activates.
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_FAILED);
        assert_eq!(t.status(), VIRTIO_CONFIG_S_FAILED);
    }

    #[test]
    fn a_queue_outside_guest_memory_is_not_activated() {
        let (mut t, calls, _) = transport();
        bring_up(&mut t, VERSION_1, 256, (0x1000, 0x2000, 2 << 20));
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // Misaligned rings, and a size that is not a power of two.
        bring_up(&mut t, VERSION_1, 256, (0x1001, 0x2000, 0x3000));
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        bring_up(&mut t, VERSION_1, 100, RINGS);
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(calls.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn interrupt_status_is_acknowledged_bit_by_bit_and_notify_writes_the_eventfd() {
        let (mut t, _, irq) = transport();
        irq.status.store(3, Ordering::SeqCst);
        assert_eq!(read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
        write(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.notify_event().read().unwrap(), 2);
        // A notification of a queue that does not exist is not one.
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(t.notify_event().read().is_err());
    }
}
