//! API connections carried through the emulated runner: on the host, where the user is, the
//! outer hvprobe accepts clients on the API socket and multiplexes them over one byte channel
//! (a QEMU chardev socket to a virtio-serial port of L1); in L1, the inner hvprobe takes each
//! connection off the port and connects it to its own API socket. So the same server answers
//! with or without a runner.
//!
//! A frame is `[connection id: u32 LE][kind: u8][length: u32 LE][data]`: `OPEN` (no data),
//! `DATA`, `CLOSE` (that side will send no more), `CREDIT` (a u32: bytes the receiver has
//! passed on). Each side sends a connection at most [`WINDOW`] bytes beyond what the other
//! has passed on, and each connection is written by its own thread: a client that stops
//! reading stalls only its own connection (its event stream then loses events in L1's
//! queue), never the channel or the other clients.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex, mpsc};

const OPEN: u8 = 1;
const DATA: u8 = 2;
const CLOSE: u8 = 3;
const CREDIT: u8 = 4;
/// Largest data of one frame.
pub const MAX_FRAME: usize = 16 * 1024;
/// Bytes of a connection in flight (sent, not yet passed on by the other side).
pub const WINDOW: usize = 64 * 1024;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The connection.
    pub id: u32,
    /// `OPEN`, `DATA` or `CLOSE`.
    pub kind: u8,
    /// Its bytes (`DATA`).
    pub data: Vec<u8>,
}

/// Writes `frame` to `w` in one piece.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    let mut buf = Vec::with_capacity(9 + frame.data.len());
    buf.extend_from_slice(&frame.id.to_le_bytes());
    buf.push(frame.kind);
    buf.extend_from_slice(&(frame.data.len() as u32).to_le_bytes());
    buf.extend_from_slice(&frame.data);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads the next frame from `r`; `None` at the end of the channel.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let id = u32::from_le_bytes(head[..4].try_into().unwrap_or_default());
    let kind = head[4];
    let len = u32::from_le_bytes(head[5..9].try_into().unwrap_or_default()) as usize;
    if len > MAX_FRAME || !matches!(kind, OPEN | DATA | CLOSE | CREDIT) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad frame: kind {kind}, {len} bytes"),
        ));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(Some(Frame { id, kind, data }))
}

/// One connection at this end: where its incoming bytes go (its writer thread), and how many
/// bytes this end may still send on it.
struct Conn {
    incoming: mpsc::Sender<Vec<u8>>,
    credit: Arc<(Mutex<usize>, Condvar)>,
    stream: UnixStream,
}

/// The connections of one end of the channel, and the channel's writing side.
struct Ends {
    channel: Mutex<Box<dyn Write + Send>>,
    conns: Mutex<HashMap<u32, Conn>>,
    /// The L1 side: the other side's `CLOSE` means its client went away, so the local
    /// connection is shut both ways (a stream being written to it ends at once). The host
    /// side passes on what is queued first, then shuts the writing side.
    close_both: bool,
}

impl Ends {
    fn send(&self, frame: &Frame) -> io::Result<()> {
        write_frame(
            &mut *self.channel.lock().unwrap_or_else(|e| e.into_inner()),
            frame,
        )
    }

    fn control(&self, id: u32, kind: u8, data: Vec<u8>) -> io::Result<()> {
        self.send(&Frame { id, kind, data })
    }

    /// Starts carrying `conn` as connection `id`: one thread copies what it sends into `DATA`
    /// frames (within the credit the other side gives) and a `CLOSE`; another writes what
    /// comes for it and gives credit back.
    /// With `announce`, the other side is told of it (`OPEN`) before any of its data.
    fn attach(self: &Arc<Self>, id: u32, conn: UnixStream, announce: bool) -> io::Result<()> {
        let mut reader = conn.try_clone()?;
        let stream = conn.try_clone()?;
        let mut writer = conn;
        let credit = Arc::new((Mutex::new(WINDOW), Condvar::new()));
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Conn {
                incoming: tx,
                credit: credit.clone(),
                stream,
            },
        );
        if announce {
            self.control(id, OPEN, Vec::new())?;
        }
        let ends = self.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                let allowed = {
                    let (lock, ready) = &*credit;
                    let c = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let c = ready
                        .wait_while(c, |c| *c == 0)
                        .unwrap_or_else(|e| e.into_inner());
                    (*c).min(MAX_FRAME)
                };
                match reader.read(&mut buf[..allowed]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        *credit.0.lock().unwrap_or_else(|e| e.into_inner()) -= n;
                        if ends.control(id, DATA, buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = ends.control(id, CLOSE, Vec::new());
        });
        let ends = self.clone();
        std::thread::spawn(move || {
            for data in rx {
                if writer.write_all(&data).is_err() {
                    break;
                }
                let passed = (data.len() as u32).to_le_bytes().to_vec();
                if ends.control(id, CREDIT, passed).is_err() {
                    break;
                }
            }
            // The other side closed (or this connection failed): no more to write.
            let _ = writer.shutdown(Shutdown::Write);
        });
        Ok(())
    }

    /// Handles the frames coming in over the channel; `open` makes the local end of a
    /// connection the other side opened (the L1 side only).
    fn demux(
        self: &Arc<Self>,
        mut channel: impl Read,
        open: Option<&dyn Fn() -> io::Result<UnixStream>>,
    ) -> io::Result<()> {
        while let Some(frame) = read_frame(&mut channel)? {
            match frame.kind {
                OPEN => {
                    let Some(open) = open else { continue };
                    if open()
                        .and_then(|c| self.attach(frame.id, c, false))
                        .is_err()
                    {
                        self.control(frame.id, CLOSE, Vec::new())?;
                    }
                }
                DATA => {
                    let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(c) = conns.get(&frame.id) {
                        let _ = c.incoming.send(frame.data);
                    }
                }
                CREDIT => {
                    let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
                    let n = frame
                        .data
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u32::from_le_bytes) as usize;
                    if let Some(c) = conns.get(&frame.id) {
                        *c.credit.0.lock().unwrap_or_else(|e| e.into_inner()) += n;
                        c.credit.1.notify_all();
                    }
                }
                _ => {
                    // Dropping the sender ends the writer thread, which shuts its side.
                    let conn = self
                        .conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&frame.id);
                    if let Some(c) = conn.filter(|_| self.close_both) {
                        let _ = c.stream.shutdown(Shutdown::Both);
                        // A reader waiting for credit reads the end and stops.
                        *c.credit.0.lock().unwrap_or_else(|e| e.into_inner()) = WINDOW;
                        c.credit.1.notify_all();
                    }
                }
            }
        }
        Ok(())
    }
}

/// The host side: accepts clients on `listener` and carries each over the channel
/// (`channel_in`, `channel_out`) until the channel ends.
pub fn serve_host(
    listener: UnixListener,
    channel_in: impl Read + Send + 'static,
    channel_out: impl Write + Send + 'static,
) {
    let ends = Arc::new(Ends {
        channel: Mutex::new(Box::new(channel_out)),
        conns: Mutex::new(HashMap::new()),
        close_both: false,
    });
    let accepting = ends.clone();
    std::thread::spawn(move || {
        let mut next_id = 1u32;
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let id = next_id;
            next_id = next_id.wrapping_add(1).max(1);
            if accepting.attach(id, conn, true).is_err() {
                let _ = accepting.control(id, CLOSE, Vec::new());
            }
        }
    });
    std::thread::spawn(move || {
        let _ = ends.demux(channel_in, None);
        // The channel ended (the runner stopped): every client's connection closes.
        ends.conns.lock().unwrap_or_else(|e| e.into_inner()).clear();
    });
}

/// A channel that has nothing to read while the other end is not connected (a virtio port
/// reads as ended until the host opens its side): waits and reads again.
struct Patient<R>(R);

impl<R: Read> Read for Patient<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }
}

/// The L1 side: takes connections off the channel and connects each with `open` (to the
/// inner hvprobe's API socket), for as long as the run lasts (the host may connect, go and
/// come back).
pub fn serve_guest(
    channel_in: impl Read + Send + 'static,
    channel_out: impl Write + Send + 'static,
    open: impl Fn() -> io::Result<UnixStream> + Send + 'static,
) {
    let ends = Arc::new(Ends {
        channel: Mutex::new(Box::new(channel_out)),
        conns: Mutex::new(HashMap::new()),
        close_both: true,
    });
    std::thread::spawn(move || {
        let _ = ends.demux(Patient(channel_in), Some(&open));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let f = Frame {
            id: 7,
            kind: DATA,
            data: b"GET /".to_vec(),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &f).unwrap();
        assert_eq!(read_frame(&mut buf.as_slice()).unwrap(), Some(f));
        assert_eq!(read_frame(&mut [].as_slice()).unwrap(), None);
        let mut bad = buf.clone();
        bad[4] = 9;
        assert!(read_frame(&mut bad.as_slice()).is_err());
    }

    #[test]
    fn clients_on_the_host_reach_the_server_behind_the_channel_each_on_its_own() {
        let dir = std::env::temp_dir().join(format!("hvprobe-mux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (front, back) = (dir.join("front.sock"), dir.join("back.sock"));
        let _ = std::fs::remove_file(&front);
        let _ = std::fs::remove_file(&back);
        // The server behind: echoes each line upper-cased, then closes.
        let server = UnixListener::bind(&back).unwrap();
        std::thread::spawn(move || {
            for c in server.incoming() {
                let c = c.unwrap();
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let mut line = String::new();
                    std::io::BufReader::new(c).read_line(&mut line).unwrap();
                    w.write_all(line.to_uppercase().as_bytes()).unwrap();
                });
            }
        });
        let (host_end, guest_end) = UnixStream::pair().unwrap();
        serve_guest(guest_end.try_clone().unwrap(), guest_end, move || {
            UnixStream::connect(&back)
        });
        serve_host(
            UnixListener::bind(&front).unwrap(),
            host_end.try_clone().unwrap(),
            host_end,
        );
        let clients: Vec<_> = (0..4)
            .map(|i| {
                let front = front.clone();
                std::thread::spawn(move || {
                    let mut c = UnixStream::connect(&front).unwrap();
                    c.write_all(format!("client {i}\n").as_bytes()).unwrap();
                    let mut answer = String::new();
                    c.read_to_string(&mut answer).unwrap();
                    answer
                })
            })
            .collect();
        for (i, c) in clients.into_iter().enumerate() {
            assert_eq!(c.join().unwrap(), format!("CLIENT {i}\n"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
