//! Resync (`docs/pair.md` §5): when the peer is back, the owner of each degraded volume copies
//! the blocks of its peer dirty bitmap to the peer's replica, then records it in sync.
//!
//! One thread per node, one volume at a time, on a data link of its own (`RESYNC_LINK`), at
//! most `--resync-rate` bytes per second. The mirror turns `Resyncing`: client writes go to
//! both nodes again, and the whole blocks both took leave the bitmap. The resync walks the
//! bitmap in chunks of up to 1 MiB of set bits; each chunk is sent under the mirror's range
//! lock (no client write to it is in flight, so what is read is what the peer ends with): its
//! holes and zeroes as ZERO frames (nothing allocated, no zeroes on the wire), its data as
//! WRITE frames. Every 64 MiB, and at the end of a pass, the peer FLUSHes, and only then are
//! the chunks' bits cleared, unless a peer operation failed meanwhile (the volume is degraded
//! again and the bits stay). The bits' clearing is durable with the volume's next commit; a
//! crash of either node before that repeats those blocks, nothing worse: the resync resumes
//! from the bitmap.
//!
//! When a pass leaves no bit set, the whole volume is held against writes for a moment: with
//! no bit set and nothing in flight, the peer's stale record is removed from etcd (guarded by
//! the volume's record), the bitmap ended (committed), and the mirror is in sync. The peer is
//! told (CONTROL `replica_in_sync`) and serves reads again.

use crate::peer::control::ControlRequest;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Node;
use crate::peer::wire::{HEADER_BYTES, Header, Kind};
use crate::target::{BlockTarget, Mirror, PeerState, TargetOp, blocking};

/// Most blocks one chunk sends (1 MiB).
const CHUNK_BLOCKS: u64 = 256;
/// Bytes sent between the peer's flushes (and clears of the bitmap).
const BATCH_BYTES: u64 = 64 << 20;

/// A resync under way, for `status` and `pair status`.
#[derive(Debug, Clone)]
pub struct ResyncProgress {
    /// Bytes to copy when it started, and copied (sent and flushed) so far.
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Bytes per second over the resync so far.
    pub rate: u64,
}

impl ResyncProgress {
    /// Seconds left at the rate so far.
    pub fn eta_secs(&self, left_bytes: u64) -> Option<u64> {
        (self.rate > 0).then(|| left_bytes / self.rate)
    }
}

impl Node {
    /// Starts the resync thread: once a second it looks for degraded volumes this node owns
    /// while the peer link is up, and resyncs them one after the other.
    pub(super) fn start_resync_thread(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("streamer-resync".into())
            .spawn(move || {
                let mut round = 0u64;
                let mut was_up = false;
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    round += 1;
                    let Some(node) = weak.upgrade() else {
                        return;
                    };
                    if node.pair.lock().is_none() {
                        return; // left the pair
                    }
                    node.check_ownership();
                    node.resync_degraded();
                    // The peer may have missed personalities while the link was down.
                    let up = node.link_up();
                    if up && !was_up {
                        node.personalities_pending_all();
                    }
                    // Both nodes compare their copies' generations when the link comes up,
                    // and those that disagreed every few seconds (a resolve clears them).
                    if up && (!was_up || round.is_multiple_of(5)) {
                        node.check_all_generations(was_up);
                    }
                    was_up = up;
                    if up {
                        node.share_personalities();
                        node.tell_replica_crashes();
                    }
                    // Images the peer lacks (it was away when they were imported) go to it.
                    if round.is_multiple_of(5) && up {
                        node.share_missing_images();
                        node.adopt_volumes();
                    }
                    if round.is_multiple_of(5) {
                        node.serve_as_recorded_all();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("starting the resync thread: {e}");
        }
    }

    /// Mirrors whose etcd record names another owner (or a higher token) were taken over
    /// while this node was cut off: they stop writing at once (their clients disconnected)
    /// and are served again as what they are now, a replica, or a split brain if this node
    /// wrote alone meanwhile.
    fn check_ownership(&self) {
        let Some((cluster, me)) = self.this_node() else {
            return;
        };
        let mirrors: Vec<(String, Arc<Mirror>)> = self
            .pair_volumes
            .mirrors
            .lock()
            .iter()
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect();
        if mirrors.is_empty() {
            return;
        }
        let Ok(records) = cluster.volume_records() else {
            return; // etcd out of reach: a degraded owner cannot have been recorded anyway
        };
        for (name, m) in mirrors {
            let deposed = match records.get(&name) {
                Some(r) => r.owner != me || r.token != m.token(),
                None => false, // deleted: the delete path takes it down
            };
            if !deposed {
                continue;
            }
            tracing::error!(
                volume = %name,
                "another node owns this volume now: it stops writing here"
            );
            let Ok(_busy) = self.busy("volume", &name) else {
                continue; // a command works on it: next second
            };
            if let Err(e) = self.serve_as_recorded(&name) {
                tracing::error!(volume = %name, "not served: {e}");
            }
        }
    }

    /// Asks the peer to end this node's data links and waits until new ones are up.
    fn fence_peer(&self) -> Result<(), String> {
        let dials = || {
            let p = self.pair.lock();
            p.as_ref().and_then(|p| p.link()).map(|l| l.data_dials())
        };
        if *self.pair_volumes.fenced_dials.lock() == dials() {
            return Ok(()); // no link replaced since the last fence
        }
        let req = ControlRequest::FenceDataLinks.encode();
        self.peer_control_pub(&req)
            .map_err(|e| format!("fencing the peer's data links: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // The workers see their links end, the dialer makes new ones (within a second).
        std::thread::sleep(Duration::from_millis(100));
        loop {
            let up = {
                let p = self.pair.lock();
                p.as_ref()
                    .and_then(|p| p.link())
                    .is_some_and(|l| l.data_links_up())
            };
            if up {
                *self.pair_volumes.fenced_dials.lock() = dials();
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the data links did not come back within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn link_up(&self) -> bool {
        matches!(
            self.pair.lock().as_ref().map(|p| p.link_state()),
            Some(crate::peer::link::LinkState::Up { .. })
        )
    }

    fn resync_degraded(&self) {
        if !self.link_up() {
            return;
        }
        let degraded: Vec<(String, Arc<Mirror>)> = self
            .pair_volumes
            .mirrors
            .lock()
            .iter()
            .filter(|(_, m)| matches!(m.peer_state(), PeerState::Degraded { .. }))
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect();
        for (name, m) in degraded {
            if !self.link_up() {
                return;
            }
            // The peer first drops the data links it had from this node (frames sent before
            // the peer was given up on must not land after the resync's), and this node's
            // workers dial new ones.
            if let Err(e) = self.fence_peer() {
                tracing::warn!(volume = %name, "resync waits: {e}");
                return;
            }
            // The copies' generations must say the peer is behind (or equal): a split brain or
            // unrelated data is never copied over.
            if !self.may_resync(&name, &m) {
                continue;
            }
            if !m.begin_resync() {
                continue;
            }
            tracing::info!(volume = %name, "resync started");
            let outcome = self.resync(&name, &m);
            self.pair_volumes.progress.lock().remove(&name);
            match &outcome {
                Ok(true) => tracing::info!(volume = %name, "resync done: the replicas are equal"),
                Ok(false) => tracing::info!(volume = %name, "resync stopped; it resumes later"),
                Err(e) => tracing::warn!(volume = %name, "resync stopped: {e}"),
            }
            if !matches!(outcome, Ok(true)) {
                // Frames of this resync's link may still wait in the peer's socket: the next
                // resync fences the peer's links from this node first, so none lands after it.
                *self.pair_volumes.fenced_dials.lock() = None;
            }
            m.end_resync(matches!(outcome, Ok(true)));
        }
    }

    /// Copies the volume's bitmap to the peer; true once the replicas are equal and recorded
    /// so.
    fn resync(&self, name: &str, m: &Mirror) -> Result<bool, String> {
        let link = {
            let p = self.pair.lock();
            let l = p.as_ref().and_then(|p| p.link()).ok_or("not in a pair")?;
            l.resync_connection()?
        };
        let rate = self.this_node().map_or(0, |(c, _)| c.config().resync_rate);
        let vol = m.volume().clone();
        let total = vol.peer_bitmap().unwrap_or(0) * 4096;
        let started = Instant::now();
        let mut progress = ResyncProgress {
            total_bytes: total,
            done_bytes: 0,
            rate: 0,
        };
        // A whole resync (after a promotion or a crash of this node) compares before it sends:
        // blocks the peer already holds equal stay as they are there (an inherited block stays
        // inherited, nothing travels).
        let compare = match self.this_node() {
            Some((c, _)) => c
                .peer()
                .ok()
                .flatten()
                .and_then(|p| c.replica_record(name, &p.name).ok().flatten())
                .is_some_and(|r| r.full || r.compare),
            None => false,
        };
        let session = if compare {
            let p = self.pair.lock();
            let l = p.as_ref().and_then(|p| p.link()).ok_or("not in a pair")?;
            Some(l.control_session()?)
        } else {
            None
        };
        let mut conn = Conn {
            session,
            name: name.to_owned(),
            s: link,
            id: m.id(),
            token: m.token(),
            sequence: 0,
            cookie: 0,
            payload_bytes: 0,
        };
        let outcome = self.resync_passes(name, m, &mut conn, &mut progress, rate, started);
        tracing::info!(
            volume = name,
            blocks_bytes = progress.done_bytes,
            payload_bytes = conn.payload_bytes,
            "resync sent"
        );
        outcome
    }

    fn resync_passes(
        &self,
        name: &str,
        m: &Mirror,
        conn: &mut Conn,
        progress: &mut ResyncProgress,
        rate: u64,
        started: Instant,
    ) -> Result<bool, String> {
        let vol = m.volume().clone();
        loop {
            // One pass over the bitmap, in batches.
            let mut from = 0;
            let mut sent_any = false;
            loop {
                if !matches!(m.peer_state(), PeerState::Resyncing { .. }) {
                    return Ok(false); // a peer failure degraded it again
                }
                let failures = m.peer_failures();
                let mut batch = Vec::new();
                let mut batch_bytes = 0;
                while batch_bytes < BATCH_BYTES {
                    let Some((first, count)) = vol.next_peer_dirty(from, CHUNK_BLOCKS) else {
                        break;
                    };
                    self.send_chunk(conn, m, first, count)?;
                    batch.push((first, count));
                    from = first + count;
                    batch_bytes += count * 4096;
                    progress.done_bytes += count * 4096;
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    progress.rate = (progress.done_bytes as f64 / secs) as u64;
                    self.pair_volumes
                        .progress
                        .lock()
                        .insert(name.to_owned(), progress.clone());
                    if rate > 0 {
                        // Paced: at most `rate` bytes per second since the start.
                        let due = Duration::from_secs_f64(progress.done_bytes as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
                if batch.is_empty() {
                    break;
                }
                sent_any = true;
                conn.flush()?;
                if m.peer_failures() != failures {
                    return Ok(false);
                }
                for (first, count) in batch {
                    vol.clear_peer_dirty(first, count);
                }
            }
            if !sent_any || vol.peer_bitmap() == Some(0) {
                break;
            }
        }
        self.finish_resync(name, m)
    }

    /// Sends blocks `first..first + count` as they are now, under the mirror's range lock,
    /// held until the peer answered. If that fails, the mirror is degraded again **before**
    /// the range is released: a frame of the chunk may still be unapplied on the peer, and a
    /// client write to the range must not reach the peer ahead of it (it is done here alone,
    /// its bit set; the next resync fences the old link first).
    fn send_chunk(
        &self,
        conn: &mut Conn,
        m: &Mirror,
        first: u64,
        count: u64,
    ) -> Result<(), String> {
        let (offset, len) = (first * 4096, count * 4096);
        let _held = m.lock_range(offset, offset + len);
        let sent = self.send_held_chunk(conn, m, first, count);
        if sent.is_err() {
            m.end_resync(false);
            *self.pair_volumes.fenced_dials.lock() = None;
        }
        sent
    }

    /// `send_chunk`'s work, with the range held.
    fn send_held_chunk(
        &self,
        conn: &mut Conn,
        m: &Mirror,
        first: u64,
        count: u64,
    ) -> Result<(), String> {
        let (offset, len) = (first * 4096, count * 4096);
        let vol = m.volume();
        let mut buf = vec![0u8; len as usize];
        let op = TargetOp::Read {
            offset,
            len: len as u32,
        };
        blocking::run(vol.as_ref(), &op, &mut buf)
            .map_err(|e| format!("reading {offset}+{len}: {e}"))?;
        // Which blocks to send: all, or (comparing) those whose checksums differ.
        let mut send = vec![true; count as usize];
        if let Some(session) = conn.session.as_mut() {
            let req = ControlRequest::Checksums {
                name: conn.name.clone(),
                first,
                blocks: count,
            }
            .encode();
            let theirs = crate::peer::control::decode_checksums(&session.call(&req)?, send.len())?;
            for (i, c) in theirs.iter().enumerate() {
                send[i] = crc32c::crc32c(&buf[i * 4096..(i + 1) * 4096]) != *c;
            }
        }
        // Runs of blocks to send, each as one frame: ZERO where all of it reads as zeroes (a
        // hole there, nothing on the wire), WRITE otherwise.
        let mut frames = 0;
        let mut i = 0;
        while i < send.len() {
            if !send[i] {
                i += 1;
                continue;
            }
            let zero = buf[i * 4096..(i + 1) * 4096].iter().all(|&b| b == 0);
            let mut j = i + 1;
            while j < send.len()
                && send[j]
                && buf[j * 4096..(j + 1) * 4096].iter().all(|&b| b == 0) == zero
            {
                j += 1;
            }
            let at = offset + i as u64 * 4096;
            let n = (j - i) as u64 * 4096;
            if zero {
                conn.send(Kind::Zero, at, n, &[])?;
            } else {
                conn.send(Kind::Write, at, n, &buf[i * 4096..j * 4096])?;
            }
            frames += 1;
            i = j;
        }
        for _ in 0..frames {
            conn.reply()?;
        }
        Ok(())
    }

    /// The bitmap is empty: with the whole volume held against writes, remove the peer's stale
    /// record, end the bitmap, and tell the peer.
    fn finish_resync(&self, name: &str, m: &Mirror) -> Result<bool, String> {
        let (cluster, _) = self.this_node().ok_or("left the pair")?;
        let size = m.volume().geometry().size_bytes;
        let failures = m.peer_failures();
        let held = m.lock_range(0, size);
        if m.volume().peer_bitmap().unwrap_or(0) > 0 {
            return Ok(false); // a partial write set bits again: another pass
        }
        let done = m.finish_resync(failures, || {
            let rec = cluster
                .volume_record(name)
                .map_err(|e| e.to_string())?
                .ok_or("the volume has no record")?;
            if rec.token != m.token() {
                return Err(format!("node {} owns the volume now", rec.owner));
            }
            // The peer's copy is this one's now: it takes this copy's generation before the
            // bitmap (and its generation) ends here, so a crash between leaves them equal.
            // etcd notes it first: a crash of this node after it rebases the bitmap's
            // generation on restart (`pair_target`), so what it writes alone after is never
            // taken for the peer's.
            cluster
                .mark_replica_adopting(name, &rec)
                .map_err(|e| e.to_string())?;
            let adopt = ControlRequest::AdoptGeneration {
                name: name.into(),
                id: m.id(),
                generation: volume_format::image::hex(&m.volume().generations().current),
            }
            .encode();
            // From here a failure (the call itself too: the peer may have adopted before its
            // answer was lost) rebases the bitmap, so this copy never writes alone under a
            // generation the peer may hold.
            let rest = self
                .peer_control_pub(&adopt)
                .map_err(|e| format!("the peer adopting this copy's generation: {e}"))
                .and_then(|_| {
                    cluster
                        .mark_replica_in_sync(name, &rec)
                        .map_err(|e| e.to_string())
                })
                .and_then(|()| match m.volume().end_peer_bitmap() {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("bits were set while nothing was in flight".into()),
                    Err(e) => Err(format!("ending the bitmap: {e}")),
                });
            if rest.is_err()
                && let Err(e) = m.volume().rebase_peer_bitmap()
            {
                tracing::error!(volume = name, "rebasing the bitmap's generation: {e}");
            }
            rest
        })?;
        drop(held);
        if !done {
            return Ok(false);
        }
        let req = ControlRequest::ReplicaInSync { name: name.into() }.encode();
        if let Err(e) = self.peer_control_pub(&req) {
            tracing::warn!(volume = name, "telling the peer it is in sync: {e}");
        }
        Ok(true)
    }
}

/// The resync's data link.
struct Conn {
    /// Comparing before sending: the peer's checksums come over this.
    session: Option<crate::peer::link::ControlSession>,
    name: String,
    s: TcpStream,
    id: u32,
    token: u64,
    sequence: u64,
    cookie: u64,
    /// Data bytes sent (WRITE payloads): what the link carried beyond headers.
    payload_bytes: u64,
}

impl Conn {
    fn send(&mut self, kind: Kind, offset: u64, range: u64, payload: &[u8]) -> Result<(), String> {
        self.sequence += 1;
        self.cookie += 1;
        let h = Header {
            token: self.token,
            sequence: self.sequence,
            offset,
            range,
            handle: self.id,
            ..Header::request(kind, self.cookie)
        }
        .with_payload(payload);
        self.payload_bytes += payload.len() as u64;
        let mut b = h.encode().to_vec();
        b.extend_from_slice(payload);
        self.s
            .write_all(&b)
            .map_err(|e| format!("sending to the peer: {e}"))
    }

    fn reply(&mut self) -> Result<(), String> {
        let mut h = [0u8; HEADER_BYTES];
        self.s
            .read_exact(&mut h)
            .map_err(|e| format!("the peer's answer: {e}"))?;
        let h = Header::decode(&h)
            .map_err(|e| format!("a malformed answer from the peer: {e}"))?
            .expect("a whole header");
        if !h.reply || h.payload_len != 0 {
            return Err(format!("the peer sent {:?} instead of an answer", h.kind));
        }
        if h.status != 0 {
            return Err(format!(
                "the peer refused {:?} at {}: {}",
                h.kind,
                h.offset,
                std::io::Error::from_raw_os_error(i32::from(h.status))
            ));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.sequence += 1;
        self.cookie += 1;
        let h = Header {
            token: self.token,
            sequence: self.sequence,
            handle: self.id,
            ..Header::request(Kind::Flush, self.cookie)
        };
        self.s
            .write_all(&h.encode())
            .map_err(|e| format!("sending to the peer: {e}"))?;
        self.reply()
    }
}
