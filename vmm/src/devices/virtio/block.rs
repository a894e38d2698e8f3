//! virtio-blk (virtio 1.2, section 5.2): the requests Linux's `virtio_blk` sends (read, write,
//! flush, get-id) served from a raw image by an I/O thread of its own, so that neither a vCPU
//! nor the event loop that serves probes ever waits for the disk. Writes reach the file in
//! the order the guest completes them (one request at a time, each done before it is used)
//! and a flush is an `fdatasync`. Data moves between the image and guest memory by one
//! `preadv`/`pwritev` on the request's guest buffers ([`GuestIo`]), with no copy in between,
//! as QEMU's and Firecracker's block devices do.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{Activation, VirtioBackend};
use super::{ActivateError, OpenDisk, SECTOR, VirtioIrq};
use crate::devices::ReadOnlyRam;

/// Entries in the one request queue (Firecracker's and QEMU's default).
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (`seg_max`: the queue size less the header
/// and status descriptors, as QEMU offers).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`); a request with more
/// segments goes in several calls.
const IOV_MAX: usize = 1024;

/// `struct virtio_blk_outhdr`: what every request starts with.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RequestHeader {
    kind: u32,
    ioprio: u32,
    sector: u64,
}

// SAFETY: plain integers, 16 bytes with no padding; any bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// Bytes `[skip, skip + len)` of a request's guest buffers (its device-readable or its
/// device-writable descriptors, in chain order) as host memory: the iovecs one `preadv` or
/// `pwritev` moves between the image and the guest, with no bounce buffer.
struct GuestIo<'a> {
    iovecs: Vec<libc::iovec>,
    /// The iovecs point into the guest memory borrowed here.
    _memory: std::marker::PhantomData<&'a GuestMemoryMmap>,
}

impl<'a> GuestIo<'a> {
    fn new(
        memory: &'a GuestMemoryMmap,
        descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        access: Permissions,
        mut skip: usize,
        len: usize,
    ) -> Result<GuestIo<'a>, vm_memory::GuestMemoryError> {
        let mut iovecs = Vec::new();
        let mut left = len;
        'chain: for d in descriptors {
            for slice in GuestMemory::get_slices(memory, d.addr(), d.len() as usize, access)? {
                if left == 0 {
                    break 'chain;
                }
                let slice = slice?;
                if skip >= slice.len() {
                    skip -= slice.len();
                    continue;
                }
                let take = (slice.len() - skip).min(left);
                let base = slice.ptr_guard_mut().as_ptr();
                iovecs.push(libc::iovec {
                    // SAFETY: `skip < slice.len()`, so the pointer stays inside the slice,
                    // which maps guest memory for as long as `memory` is borrowed (plain
                    // mmap regions: the guard does not unmap anything when dropped).
                    iov_base: unsafe { base.add(skip) }.cast(),
                    iov_len: take,
                });
                left -= take;
                skip = 0;
            }
        }
        Ok(GuestIo {
            iovecs,
            _memory: std::marker::PhantomData,
        })
    }

    /// Fills the buffers from `file` at byte `at`; running past the end of the file is an
    /// error.
    fn read_from(mut self, file: &File, at: u64) -> std::io::Result<()> {
        self.transfer(
            at,
            |fd, iov, n, off| {
                // SAFETY: every iovec points at `iov_len` bytes of guest memory that stays
                // mapped while `self` borrows it; the kernel writes only inside them.
                unsafe { libc::preadv(fd, iov, n, off) }
            },
            file,
        )
    }

    /// Writes the buffers to `file` at byte `at`.
    fn write_to(mut self, file: &File, at: u64) -> std::io::Result<()> {
        self.transfer(
            at,
            |fd, iov, n, off| {
                // SAFETY: as in `read_from`; the kernel only reads the buffers.
                unsafe { libc::pwritev(fd, iov, n, off) }
            },
            file,
        )
    }

    /// Calls `op` (preadv or pwritev) until every byte moved, resuming after a short one.
    fn transfer(
        &mut self,
        mut at: u64,
        op: impl Fn(libc::c_int, *const libc::iovec, libc::c_int, libc::off_t) -> isize,
        file: &File,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut iov = self.iovecs.as_mut_slice();
        while !iov.is_empty() {
            let count = iov.len().min(IOV_MAX);
            let offset = libc::off_t::try_from(at)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            let n = op(file.as_raw_fd(), iov.as_ptr(), count as libc::c_int, offset);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            at += n as u64;
            iov = advance(iov, n as usize);
        }
        Ok(())
    }
}

/// `iov` less its first `n` bytes: whole iovecs dropped, a partly done one shortened.
fn advance(iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iov.len() && n >= iov[first].iov_len {
        n -= iov[first].iov_len;
        first += 1;
    }
    let rest = &mut iov[first..];
    if let Some(v) = rest.first_mut() {
        // SAFETY: `n < v.iov_len`, so the pointer stays inside the iovec's buffer.
        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
        v.iov_len -= n;
    }
    rest
}

/// Refused device writes into read-only guest memory reported one line each, up to this
/// many; the rest are counted only.
const REFUSALS_REPORTED: u64 = 10;

/// A disk's requests, executed against its image.
pub struct RequestExecutor {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Guest memory the device may not write.
    guest_read_only: Arc<ReadOnlyRam>,
    /// The disk's place on the command line, for messages.
    index: usize,
}

impl RequestExecutor {
    fn new(
        disk: &OpenDisk,
        (id, index): ([u8; VIRTIO_BLK_ID_BYTES as usize], usize),
        guest_read_only: Arc<ReadOnlyRam>,
    ) -> std::io::Result<Self> {
        Ok(RequestExecutor {
            // The same open file (and flock) as the disk's.
            file: disk.file.try_clone()?,
            sectors: disk.sectors,
            read_only: disk.read_only,
            id,
            guest_read_only,
            index,
        })
    }

    /// The first byte of the chain's device-writable buffers that the guest may not write
    /// (a protected page, hvprobe's code), if any: such a request is refused whole, so a
    /// device is no way around `--protect`.
    fn writes_read_only(&self, chain: &DescriptorChain<&GuestMemoryMmap>) -> Option<u64> {
        chain.clone().writable().find_map(|d| {
            self.guest_read_only
                .first_read_only(d.addr().0, d.len().into())
        })
    }

    /// Executes the request in `chain`; returns the bytes written into the guest's buffers
    /// (the used length: data read, the ID, and the status byte).
    pub fn execute(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) =
            (chain.clone().reader(memory), chain.clone().writer(memory))
        else {
            return 0;
        };
        // The status byte is the chain's last writable byte; without one nothing can be said.
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return 0;
        };
        let Ok(mut status) = writer.split_at(data_len) else {
            return 0;
        };
        if let Some(gpa) = self.writes_read_only(&chain) {
            let n = self.guest_read_only.count_refusal();
            if n <= REFUSALS_REPORTED {
                eprintln!(
                    "hvprobe: virtio-blk disk {}: refused a request that would write read-only guest memory at {gpa:#x} (a protected page or hvprobe's code); the guest sees an I/O error{}",
                    self.index,
                    if n == REFUSALS_REPORTED {
                        " (further refusals are counted, not shown)"
                    } else {
                        ""
                    }
                );
            }
            // The status byte may be read-only itself: then nothing at all is written.
            let last = chain.clone().writable().last();
            let status_at = last.map(|d| d.addr().0 + u64::from(d.len()) - 1);
            return match status_at.and_then(|a| self.guest_read_only.first_read_only(a, 1)) {
                None if status.write_all(&[VIRTIO_BLK_S_IOERR as u8]).is_ok() => 1,
                _ => 0,
            };
        }
        let (code, written) = self.request(memory, &chain, &mut reader, &mut writer);
        if status.write_all(&[code as u8]).is_err() {
            return written as u32;
        }
        written as u32 + 1
    }

    /// Executes one request; returns its status and the data bytes written into the guest.
    fn request(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: &DescriptorChain<&GuestMemoryMmap>,
        reader: &mut Reader<'_>,
        writer: &mut Writer<'_>,
    ) -> (u32, usize) {
        let Ok(header) = reader.read_obj::<RequestHeader>() else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let outcome = match header.kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let Some(at) = self.span(header.sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let into =
                    GuestIo::new(memory, chain.clone().writable(), Permissions::Write, 0, len);
                match into.map(|io| io.read_from(&self.file, at)) {
                    Ok(Ok(())) => return (VIRTIO_BLK_S_OK, len),
                    _ => return (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_OUT => {
                let (skip, len) = (reader.bytes_read(), reader.available_bytes());
                match self.span(header.sector, len) {
                    Some(_) if self.read_only => return (VIRTIO_BLK_S_IOERR, 0),
                    Some(at) => GuestIo::new(
                        memory,
                        chain.clone().readable(),
                        Permissions::Read,
                        skip,
                        len,
                    )
                    .map_err(std::io::Error::other)
                    .and_then(|io| io.write_to(&self.file, at)),
                    None => return (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH if self.read_only => Ok(()),
            VIRTIO_BLK_T_FLUSH => self.file.sync_data(),
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                writer.write_all(&self.id[..n])
            }
            _ => return (VIRTIO_BLK_S_UNSUPP, 0),
        };
        match outcome {
            Ok(()) => (VIRTIO_BLK_S_OK, writer.bytes_written()),
            Err(_) => (VIRTIO_BLK_S_IOERR, writer.bytes_written()),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors on the disk.
    fn span(&self, sector: u64, len: usize) -> Option<u64> {
        let len = u64::try_from(len).ok()?;
        let end = sector.checked_add(len / SECTOR)?;
        (len.is_multiple_of(SECTOR) && end <= self.sectors).then_some(sector * SECTOR)
    }
}

/// The serial number the guest reads (`/sys/block/vda/serial`): `hv<index>-` (the disk's
/// place on the command line, by which the default guest's `/init` finds where to mount it,
/// whatever order the kernel named the disks in), then the image's device and inode numbers,
/// as kvmtool and Firecracker make it, so it names this image on this host.
fn disk_id(disk: &OpenDisk, index: usize) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    if let Ok(m) = disk.file.metadata() {
        let text = format!("hv{index}-{:x}-{:x}", m.dev(), m.ino());
        let n = text.len().min(id.len());
        id[..n].copy_from_slice(&text.as_bytes()[..n]);
    }
    id
}

/// Serves one queue until told to stop: woken by the queue's notification, it executes every
/// request posted, puts each in the used ring, and interrupts the guest when the driver
/// wants it to.
struct IoThread {
    executor: RequestExecutor,
    memory: GuestMemoryMmap,
    queue: Queue,
    irq: VirtioIrq,
}

impl IoThread {
    fn run(mut self, notify: EventFd, stop: EventFd) {
        let epoll = match Epoll::new().and_then(|e| {
            e.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&notify),
                EpollEvent::new(EventSet::IN, 0),
            )?;
            e.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&stop),
                EpollEvent::new(EventSet::IN, 1),
            )?;
            Ok(e)
        }) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("hvprobe: virtio-blk: epoll: {e}; the disk does not answer");
                return;
            }
        };
        // Requests posted before DRIVER_OK (or notified before the ioeventfd existed).
        if let Err(e) = self.drain() {
            eprintln!("hvprobe: virtio-blk: {e}; the disk stops");
            return;
        }
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("hvprobe: virtio-blk: epoll: {e}; the disk stops");
                    return;
                }
            };
            if events[..n].iter().any(|e| e.data() == 1) {
                return;
            }
            let _ = notify.read();
            if let Err(e) = self.drain() {
                eprintln!("hvprobe: virtio-blk: {e}; the disk stops");
                return;
            }
        }
    }

    /// Executes every available request; interrupts once at the end if the driver asked.
    fn drain(&mut self) -> Result<(), virtio_queue::Error> {
        let memory = &self.memory;
        let mut used = false;
        loop {
            self.queue.disable_notification(memory)?;
            while let Some(chain) = self.queue.pop_descriptor_chain(memory) {
                let head = chain.head_index();
                let len = self.executor.execute(memory, chain);
                self.queue.add_used(memory, head, len)?;
                used = true;
            }
            // A request posted while notifications were off: go round again.
            if !self.queue.enable_notification(memory)? {
                break;
            }
        }
        if used && self.queue.needs_notification(memory)? {
            let _ = self.irq.signal_used();
        }
        Ok(())
    }
}

/// A running I/O thread and how to stop it.
struct Running {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// The virtio-blk device behind a transport: one image, one queue, one I/O thread while the
/// driver has the device running.
pub struct Block {
    disk: OpenDisk,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    index: usize,
    guest_read_only: Arc<ReadOnlyRam>,
    running: Option<Running>,
}

impl Block {
    /// A device serving `disk`, the `index`th of the guest's, that writes no guest memory
    /// `guest_read_only` holds.
    pub fn new(disk: OpenDisk, index: usize, guest_read_only: Arc<ReadOnlyRam>) -> Block {
        let id = disk_id(&disk, index);
        Block {
            disk,
            id,
            index,
            guest_read_only,
            running: None,
        }
    }

    /// `struct virtio_blk_config` as far as offered: capacity, size_max (0: not offered),
    /// seg_max.
    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }
}

impl VirtioBackend for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.reset();
        let executor = RequestExecutor::new(
            &self.disk,
            (self.id, self.index),
            self.guest_read_only.clone(),
        )
        .map_err(ActivateError::Image)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::EventFd)?;
        let stop_theirs = stop.try_clone().map_err(ActivateError::EventFd)?;
        let io = IoThread {
            executor,
            memory: a.memory,
            queue: a.queue,
            irq: a.irq,
        };
        let notify = a.notify;
        let thread = std::thread::Builder::new()
            .name("hvprobe-blk".into())
            .spawn(move || io.run(notify, stop_theirs))
            .map_err(ActivateError::Thread)?;
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.write(1);
            let _ = r.thread.join();
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::BusDevice;
    use crate::devices::virtio::DiskSpec;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::mmio::tests::{bring_up, memory, write};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 16;

    /// A virtio driver's side of one split queue in guest memory: descriptors, the
    /// available ring and what the device put in the used ring.
    struct Driver<'a> {
        memory: &'a GuestMemoryMmap,
        next_desc: u16,
        avail_idx: u16,
    }

    impl<'a> Driver<'a> {
        fn new(memory: &'a GuestMemoryMmap) -> Self {
            Driver {
                memory,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        fn descriptor(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(table + 16 * u64::from(i));
            let m = self.memory;
            m.write_obj(addr, at).unwrap();
            m.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            m.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }

        /// Posts a chain of `(address, length, device-writable)` buffers; returns its head.
        fn post(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, (addr, len, w)) in buffers.iter().enumerate() {
                let idx = self.next_desc;
                let last = i + 1 == buffers.len();
                let flags = if *w { WRITE } else { 0 } | if last { 0 } else { NEXT };
                self.descriptor(DESC, idx, *addr, *len, flags, (idx + 1) % SIZE);
                self.next_desc = (idx + 1) % SIZE;
            }
            self.publish(head);
            head
        }

        /// Posts the chain through an indirect table at `table`: one ring slot.
        fn post_indirect(&mut self, table: u64, buffers: &[(u64, u32, bool)]) -> u16 {
            for (i, (addr, len, w)) in buffers.iter().enumerate() {
                let last = i + 1 == buffers.len();
                let flags = if *w { WRITE } else { 0 } | if last { 0 } else { NEXT };
                self.descriptor(table, i as u16, *addr, *len, flags, i as u16 + 1);
            }
            let head = self.next_desc;
            self.descriptor(DESC, head, table, 16 * buffers.len() as u32, INDIRECT, 0);
            self.next_desc = (head + 1) % SIZE;
            self.publish(head);
            head
        }

        fn publish(&mut self, head: u16) {
            let m = self.memory;
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
            m.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.memory.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        /// The used ring's entry `i`: (head, length).
        fn used(&self, i: u16) -> (u32, u32) {
            let at = USED + 4 + 8 * u64::from(i % SIZE);
            let m = self.memory;
            (
                m.read_obj(GuestAddress(at)).unwrap(),
                m.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }
    }

    fn header(memory: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        memory
            .write_obj(
                RequestHeader {
                    kind,
                    ioprio: 0,
                    sector,
                },
                GuestAddress(at),
            )
            .unwrap();
    }

    fn image(name: &str, sectors: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hvprobe-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let bytes: Vec<u8> = (0..sectors * SECTOR).map(|i| (i / SECTOR) as u8).collect();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn open(path: &std::path::Path, ro: bool) -> OpenDisk {
        let spec = format!("{}{}", path.display(), if ro { ",ro" } else { "" });
        DiskSpec::parse(&spec).unwrap().open().unwrap()
    }

    /// Executes every posted chain directly (no thread): (head, used length) per request.
    fn run(
        executor: &mut RequestExecutor,
        memory: &GuestMemoryMmap,
        posted: u16,
    ) -> Vec<(u16, u32)> {
        let mut q = queue_from(0);
        let mut out = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            out.push((head, executor.execute(memory, chain)));
        }
        assert_eq!(out.len(), usize::from(posted));
        out
    }

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn status(memory: &GuestMemoryMmap, at: u64) -> u32 {
        u32::from(memory.read_obj::<u8>(GuestAddress(at)).unwrap())
    }

    #[test]
    fn reads_writes_flushes_and_ids_do_what_virtio_blk_says() {
        let path = image("rw.img", 64);
        let disk = open(&path, false);
        let id = disk_id(&disk, 3);
        let mut ex = RequestExecutor::new(&disk, (id, 3), Arc::default()).unwrap();
        let memory = memory();
        let mut d = Driver::new(&memory);
        // Read sectors 3 and 4 into two segments.
        header(&memory, HDR, VIRTIO_BLK_T_IN, 3);
        d.post(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ]);
        // Write sectors 10..12 from one segment, then flush, then get the ID.
        memory
            .write_slice(&[0xa5; 1024], GuestAddress(DATA + 0x4000))
            .unwrap();
        header(&memory, HDR + 0x100, VIRTIO_BLK_T_OUT, 10);
        d.post(&[
            (HDR + 0x100, 16, false),
            (DATA + 0x4000, 1024, false),
            (STATUS + 1, 1, true),
        ]);
        header(&memory, HDR + 0x200, VIRTIO_BLK_T_FLUSH, 0);
        d.post(&[(HDR + 0x200, 16, false), (STATUS + 2, 1, true)]);
        header(&memory, HDR + 0x300, VIRTIO_BLK_T_GET_ID, 0);
        d.post(&[
            (HDR + 0x300, 16, false),
            (DATA + 0x8000, 20, true),
            (STATUS + 3, 1, true),
        ]);
        let used = run(&mut ex, &memory, 4);
        assert_eq!(used, vec![(0, 1025), (4, 1), (7, 1), (9, 21)]);
        for s in 0..4 {
            assert_eq!(status(&memory, STATUS + s), VIRTIO_BLK_S_OK, "request {s}");
        }
        let mut got = [0u8; 512];
        memory.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [3; 512]);
        memory
            .read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(got, [4; 512]);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[10 * 512..12 * 512], &[0xa5; 1024][..]);
        assert_eq!(&file[12 * 512..13 * 512], &[12; 512][..], "nothing past it");
        assert_eq!(&file[9 * 512..10 * 512], &[9; 512][..], "nothing before it");
        let mut serial = [0u8; 20];
        memory
            .read_slice(&mut serial, GuestAddress(DATA + 0x8000))
            .unwrap();
        assert_eq!(serial, id);
        assert!(serial.starts_with(b"hv3-"));
    }

    #[test]
    fn data_sharing_a_descriptor_with_the_header_or_the_status_moves_byte_for_byte() {
        // virtio 1.x lets the driver frame a request any way (2.7.4): the header and the
        // first data bytes in one buffer, the last data bytes and the status in another, and
        // segments that are not whole sectors.
        let path = image("layout.img", 16);
        let disk = open(&path, false);
        let mut ex = RequestExecutor::new(&disk, (disk_id(&disk, 0), 0), Arc::default()).unwrap();
        let memory = memory();
        let mut d = Driver::new(&memory);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
        header(&memory, HDR, VIRTIO_BLK_T_OUT, 5);
        memory
            .write_slice(&data[..100], GuestAddress(HDR + 16))
            .unwrap();
        memory
            .write_slice(&data[100..], GuestAddress(DATA))
            .unwrap();
        d.post(&[(HDR, 116, false), (DATA, 924, false), (STATUS, 1, true)]);
        // Read it back: 1000 bytes in one buffer, the last 24 and the status in another.
        header(&memory, HDR + 0x100, VIRTIO_BLK_T_IN, 5);
        d.post(&[
            (HDR + 0x100, 16, false),
            (DATA + 0x4000, 1000, true),
            (DATA + 0x8000, 25, true),
        ]);
        let used = run(&mut ex, &memory, 2);
        assert_eq!(used, vec![(0, 1), (3, 1025)]);
        assert_eq!(status(&memory, STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(status(&memory, DATA + 0x8000 + 24), VIRTIO_BLK_S_OK);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[5 * 512..7 * 512], &data[..]);
        assert_eq!(&file[4 * 512..5 * 512], &[4; 512][..], "nothing before it");
        assert_eq!(&file[7 * 512..8 * 512], &[7; 512][..], "nothing past it");
        let mut back = vec![0u8; 1024];
        memory
            .read_slice(&mut back[..1000], GuestAddress(DATA + 0x4000))
            .unwrap();
        memory
            .read_slice(&mut back[1000..], GuestAddress(DATA + 0x8000))
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn requests_that_would_write_read_only_guest_memory_are_refused_and_write_nothing() {
        let path = image("ro-guest.img", 16);
        let disk = open(&path, false);
        let guest_read_only = Arc::new(ReadOnlyRam::new(vec![(DATA + 0x8000, DATA + 0x9000)]));
        guest_read_only.set_protected(&[(DATA + 0x1000, DATA + 0x2000)]);
        let mut ex =
            RequestExecutor::new(&disk, (disk_id(&disk, 0), 0), guest_read_only.clone()).unwrap();
        let memory = memory();
        let mut d = Driver::new(&memory);
        memory
            .write_slice(&[0x5a; 0x3000], GuestAddress(DATA))
            .unwrap();
        // A read whose second segment is a protected page; a get-id into hvprobe's code; a
        // read whose status byte is protected; a write from a protected page (a read of
        // guest memory: allowed); a read beside the protected page.
        header(&memory, HDR, VIRTIO_BLK_T_IN, 1);
        d.post(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ]);
        header(&memory, HDR + 0x100, VIRTIO_BLK_T_GET_ID, 0);
        d.post(&[
            (HDR + 0x100, 16, false),
            (DATA + 0x8000, 20, true),
            (STATUS + 1, 1, true),
        ]);
        header(&memory, HDR + 0x200, VIRTIO_BLK_T_IN, 2);
        d.post(&[
            (HDR + 0x200, 16, false),
            (DATA + 0x2000, 512, true),
            (DATA + 0x1fff, 1, true),
        ]);
        header(&memory, HDR + 0x300, VIRTIO_BLK_T_OUT, 3);
        d.post(&[
            (HDR + 0x300, 16, false),
            (DATA + 0x1000, 512, false),
            (STATUS + 3, 1, true),
        ]);
        header(&memory, HDR + 0x400, VIRTIO_BLK_T_IN, 4);
        d.post(&[
            (HDR + 0x400, 16, false),
            (DATA + 0x2000, 512, true),
            (STATUS + 4, 1, true),
        ]);
        let used = run(&mut ex, &memory, 5);
        assert_eq!(
            used.iter().map(|u| u.1).collect::<Vec<_>>(),
            [1, 1, 0, 1, 513]
        );
        assert_eq!(status(&memory, STATUS), VIRTIO_BLK_S_IOERR);
        assert_eq!(status(&memory, STATUS + 1), VIRTIO_BLK_S_IOERR);
        assert_eq!(status(&memory, STATUS + 3), VIRTIO_BLK_S_OK);
        assert_eq!(status(&memory, STATUS + 4), VIRTIO_BLK_S_OK);
        assert_eq!(guest_read_only.refused(), 3);
        let mut got = vec![0u8; 0x3000];
        memory.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(
            got[..0x2000].iter().all(|&b| b == 0x5a),
            "the refused reads wrote nothing"
        );
        assert_eq!(
            &got[0x2000..0x2200],
            &[4; 512][..],
            "the last read beside it was made"
        );
        let mut id = [0u8; 20];
        memory
            .read_slice(&mut id, GuestAddress(DATA + 0x8000))
            .unwrap();
        assert_eq!(id, [0; 20]);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(
            &file[3 * 512..4 * 512],
            &[0x5a; 512][..],
            "the write was made"
        );
    }

    #[test]
    fn a_short_transfer_resumes_at_the_first_byte_not_moved() {
        let mut bufs = [[0u8; 8]; 3];
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let base1 = iov[1].iov_base as usize;
        let rest = advance(&mut iov, 11);
        assert_eq!(rest.len(), 2);
        assert_eq!((rest[0].iov_base as usize, rest[0].iov_len), (base1 + 3, 5));
        let rest = advance(rest, 5);
        assert_eq!((rest.len(), rest[0].iov_len), (1, 8));
        assert!(advance(rest, 8).is_empty());
    }

    #[test]
    fn bad_requests_fail_with_the_status_virtio_blk_defines_and_change_nothing() {
        let path = image("bad.img", 8);
        let before = std::fs::read(&path).unwrap();
        let disk = open(&path, false);
        let mut ex = RequestExecutor::new(&disk, (disk_id(&disk, 0), 0), Arc::default()).unwrap();
        let memory = memory();
        let mut d = Driver::new(&memory);
        // Past the end; a length that is not whole sectors; an unknown type; a header too short.
        header(&memory, HDR, VIRTIO_BLK_T_OUT, 7);
        d.post(&[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]);
        header(&memory, HDR + 0x100, VIRTIO_BLK_T_IN, 0);
        d.post(&[
            (HDR + 0x100, 16, false),
            (DATA, 100, true),
            (STATUS + 1, 1, true),
        ]);
        header(&memory, HDR + 0x200, 11, 0);
        d.post(&[(HDR + 0x200, 16, false), (STATUS + 2, 1, true)]);
        d.post(&[(HDR + 0x300, 8, false), (STATUS + 3, 1, true)]);
        header(&memory, HDR + 0x400, VIRTIO_BLK_T_OUT, u64::MAX);
        d.post(&[
            (HDR + 0x400, 16, false),
            (DATA, 512, false),
            (STATUS + 4, 1, true),
        ]);
        let used = run(&mut ex, &memory, 5);
        assert!(used.iter().all(|(_, len)| *len == 1), "{used:?}");
        for (s, want) in [
            VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_S_UNSUPP,
            VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_S_IOERR,
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(status(&memory, STATUS + s as u64), want, "request {s}");
        }
        // No writable byte for a status: used with length 0, nothing done.
        header(&memory, HDR, VIRTIO_BLK_T_OUT, 0);
        d.post(&[(HDR, 16, false), (DATA, 512, false)]);
        let mut q = queue_from(d.avail_idx - 1);
        let chain = q.pop_descriptor_chain(&memory).unwrap();
        assert_eq!(ex.execute(&memory, chain), 0);
        drop(ex);
        drop(disk);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// The test driver's queue as the device sees it, its next request the `at`-th posted.
    fn queue_from(at: u16) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_ready(true);
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_next_avail(at);
        q
    }

    #[test]
    fn a_read_only_disk_fails_writes_and_never_changes_the_file() {
        let path = image("ro.img", 8);
        let before = std::fs::read(&path).unwrap();
        let disk = open(&path, true);
        let block = Block::new(open(&path, true), 0, Arc::default());
        assert_ne!(block.features() & 1 << VIRTIO_BLK_F_RO, 0);
        let mut ex = RequestExecutor::new(&disk, (disk_id(&disk, 0), 0), Arc::default()).unwrap();
        let memory = memory();
        let mut d = Driver::new(&memory);
        header(&memory, HDR, VIRTIO_BLK_T_OUT, 0);
        d.post(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        header(&memory, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
        d.post(&[(HDR + 0x100, 16, false), (STATUS + 1, 1, true)]);
        header(&memory, HDR + 0x200, VIRTIO_BLK_T_IN, 5);
        d.post(&[
            (HDR + 0x200, 16, false),
            (DATA, 512, true),
            (STATUS + 2, 1, true),
        ]);
        run(&mut ex, &memory, 3);
        assert_eq!(status(&memory, STATUS), VIRTIO_BLK_S_IOERR);
        assert_eq!(status(&memory, STATUS + 1), VIRTIO_BLK_S_OK);
        assert_eq!(status(&memory, STATUS + 2), VIRTIO_BLK_S_OK);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 5);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn the_config_space_gives_capacity_and_seg_max() {
        let path = image("cfg.img", 24);
        let block = Block::new(open(&path, false), 0, Arc::default());
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 24);
        // Linux reads the 64-bit capacity as two 32-bit halves.
        let mut hi = [0xffu8; 4];
        block.read_config(4, &mut hi);
        assert_eq!(hi, [0; 4]);
        let mut seg = [0u8; 4];
        block.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        let mut past = [0xffu8; 4];
        block.read_config(4096, &mut past);
        assert_eq!(past, [0; 4]);
        assert_eq!(block.features() & 1 << VIRTIO_BLK_F_RO, 0);
    }

    /// Waits for the irq eventfd; the interrupt count.
    fn interrupt(irq: &VirtioIrq) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(n) = irq.evt.read() {
                return n;
            }
            assert!(Instant::now() < deadline, "no interrupt");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_io_thread_serves_notified_requests_and_interrupts_then_stops_on_reset() {
        let path = image("thread.img", 2048);
        let memory = memory();
        let irq = VirtioIrq::new().unwrap();
        let mut t = MmioTransport::new(
            Box::new(Block::new(open(&path, false), 0, Arc::default())),
            memory.clone(),
            irq.clone(),
        )
        .unwrap();
        bring_up(
            &mut t,
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_RING_F_INDIRECT_DESC,
            SIZE,
            (DESC, AVAIL, USED),
        );
        let mut d = Driver::new(&memory);
        // A 64 KiB write through an indirect table, then a read of it back.
        memory
            .write_slice(&[0x3c; 64 << 10], GuestAddress(0x40000))
            .unwrap();
        header(&memory, HDR, VIRTIO_BLK_T_OUT, 1000);
        d.post_indirect(
            0x8000,
            &[
                (HDR, 16, false),
                (0x40000, 64 << 10, false),
                (STATUS, 1, true),
            ],
        );
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(interrupt(&irq) >= 1);
        assert_eq!(irq.status.load(Ordering::SeqCst) & 1, 1);
        assert_eq!((d.used_idx(), d.used(0)), (1, (0, 1)));
        assert_eq!(status(&memory, STATUS), VIRTIO_BLK_S_OK);
        header(&memory, HDR + 0x100, VIRTIO_BLK_T_IN, 1000);
        d.post(&[
            (HDR + 0x100, 16, false),
            (0x60000, 64 << 10, true),
            (STATUS + 1, 1, true),
        ]);
        t.write(VIRTIO_MMIO_QUEUE_NOTIFY.into(), &0u32.to_le_bytes());
        interrupt(&irq);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.used(1), (1, (64 << 10) + 1));
        let mut back = vec![0u8; 64 << 10];
        memory.read_slice(&mut back, GuestAddress(0x60000)).unwrap();
        assert!(back.iter().all(|b| *b == 0x3c));
        // Reset joins the thread; a request posted after it is not served.
        write(&mut t, virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS, 0);
        header(&memory, HDR + 0x200, VIRTIO_BLK_T_FLUSH, 0);
        d.post(&[(HDR + 0x200, 16, false), (STATUS + 2, 1, true)]);
        write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(d.used_idx(), 2);
        let file = std::fs::read(&path).unwrap();
        assert!(file[1000 * 512..1128 * 512].iter().all(|b| *b == 0x3c));
    }
}
