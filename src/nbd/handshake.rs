//! Fixed-newstyle negotiation as a pure state machine: bytes from the client go in, bytes for the
//! client come out, and the machine ends in one decision: enter transmission with an export, or close.
//! No sockets, no clocks: the connection driver owns those (and the handshake timeout).

use super::wire::*;

/// Longest option payload read into memory. Longer known options are answered `NBD_REP_ERR_TOO_BIG`
/// (unknown ones `NBD_REP_ERR_UNSUP`, those that take no data `NBD_REP_ERR_INVALID`, ABORT its ACK) and
/// their payload is discarded as it arrives, so a client claiming 1 GiB costs no memory.
pub const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Options accepted on one connection before the server gives up on the client, with this many
/// more per export: a client may ask about every export one option at a time (`nbdinfo --list`
/// sends two or three per export; with a flat 4096, a pool of 1700 volumes could not be listed).
pub const MAX_OPTIONS: u32 = 4096;
pub const MAX_OPTIONS_PER_EXPORT: u32 = 4;
/// `advance` stops before the next option while this many reply bytes wait to be sent, and goes
/// on when called again: a client that sends options and never reads the replies (a LIST of a
/// pool with a thousand volumes is tens of KiB) holds at most this much plus one reply.
pub const MAX_PENDING_REPLY_BYTES: usize = 64 * 1024;

/// What the handshake needs to know about an export to describe it to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (a client that opened the default export "" learns it from `NBD_INFO_NAME`).
    pub name: String,
    pub size_bytes: u64,
    pub description: String,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_fast_zero: bool,
    pub can_cache: bool,
    pub can_multi_conn: bool,
    pub block_min: u32,
    pub block_preferred: u32,
    pub block_max: u32,
}

/// The exports a server offers, as the handshake sees them.
pub trait ExportLookup {
    /// Whatever the transport needs to reach the export once chosen (a target handle).
    type Export;
    fn lookup(&self, name: &str) -> Option<(Self::Export, ExportInfo)>;
    /// Calls `f(name, description)` for every export, for `NBD_OPT_LIST`.
    fn for_each(&self, f: &mut dyn FnMut(&str, &str));
    /// How many exports there are.
    fn count(&self) -> usize {
        let mut n = 0;
        self.for_each(&mut |_, _| n += 1);
        n
    }
}

/// Options one connection may send (see `MAX_OPTIONS`).
fn option_limit(exports: usize) -> u32 {
    let per_export = u32::try_from(exports)
        .unwrap_or(u32::MAX)
        .saturating_mul(MAX_OPTIONS_PER_EXPORT);
    MAX_OPTIONS.saturating_add(per_export)
}

/// How replies are framed in the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// 16-byte simple replies only (the Linux kernel client).
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: 20-byte chunk headers, 28-byte requests.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and chunk headers with 64-bit lengths.
    Extended,
}

/// The outcome of a successful negotiation.
#[derive(Debug)]
pub struct Negotiated<E> {
    pub export_name: String,
    pub export: E,
    pub info: ExportInfo,
    pub transmission_flags: u16,
    pub mode: ReplyMode,
    /// `base:allocation` was selected for this export with `NBD_OPT_SET_META_CONTEXT`.
    pub base_allocation: bool,
    /// The minimum block size the client agreed to: the export's own when the client asked for
    /// block sizes in `NBD_OPT_GO` (and so MUST abide by them), else 1 (any alignment is served).
    pub block_min: u32,
    /// The client asked for block sizes in `NBD_OPT_GO`, and so agreed to all of them.
    pub sizes_agreed: bool,
}

/// Why the server ends a connection during negotiation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("client sent bad option magic {0:#x}")]
    BadMagic(u64),
    #[error("client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client aborted negotiation")]
    Aborted,
    #[error("server shutting down")]
    ShuttingDown,
    #[error("client asked for unknown export {0} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME with an invalid or oversized name")]
    BadExportName,
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameAfterExtendedHeaders,
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
}

/// What the driver does after feeding bytes in.
#[derive(Debug)]
pub enum Step<E> {
    /// Send what was written to `out`, then read more from the client.
    NeedMore,
    /// `MAX_PENDING_REPLY_BYTES` of replies wait in `out`: the next option is left in the input
    /// until the client has read them. Send `out`, and feed the input again once a send completes.
    Paused,
    /// Send what was written to `out`, then close the connection.
    Close(CloseReason),
    /// Send what was written to `out`; the bytes after `consumed` belong to the transmission phase.
    Transmission(Negotiated<E>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    /// Discarding the payload of an option too long to read.
    Skip {
        remaining_bytes: u64,
    },
}

/// One connection's negotiation state.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    no_zeroes: bool,
    mode: ReplyMode,
    /// Export name and selection of the last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(String, bool)>,
    options_seen: u32,
    /// The server is shutting down: options are answered `NBD_REP_ERR_SHUTDOWN`.
    shutting_down: bool,
    /// The last export name a client asked for that does not exist (for the connection's log:
    /// an operator whose client gets "unknown export" wants to see what it asked for).
    unknown_export: Option<String>,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    pub fn new() -> Self {
        Handshake {
            state: State::ClientFlags,
            no_zeroes: false,
            mode: ReplyMode::Simple,
            meta: None,
            options_seen: 0,
            shutting_down: false,
            unknown_export: None,
        }
    }

    /// The export name a client last asked for that does not exist, once (already shortened
    /// and escaped for a message).
    pub fn take_unknown_export(&mut self) -> Option<String> {
        self.unknown_export.take()
    }

    /// The server is shutting down: from now on every option but `NBD_OPT_ABORT` is answered
    /// `NBD_REP_ERR_SHUTDOWN` (the spec's hint to the client to go away), and `NBD_OPT_EXPORT_NAME`,
    /// which has no error reply, ends the connection.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// The server's greeting, sent as soon as a client connects.
    pub fn greeting(out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    }

    /// Feeds the bytes received so far. Returns how many were consumed (the caller drops them) and
    /// what to do next. Replies are appended to `out`.
    pub fn advance<L: ExportLookup>(
        &mut self,
        input: &[u8],
        exports: &L,
        out: &mut Vec<u8>,
    ) -> (usize, Step<L::Export>) {
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            match self.state {
                State::ClientFlags => {
                    let Some(flags) = rest.first_chunk::<4>() else {
                        return (consumed, Step::NeedMore);
                    };
                    let flags = u32::from_be_bytes(*flags);
                    consumed += 4;
                    if flags & !CLIENT_KNOWN_FLAGS != 0 {
                        return (
                            consumed,
                            Step::Close(CloseReason::UnknownClientFlags(flags)),
                        );
                    }
                    // A client without CLIENT_FIXED_NEWSTYLE is served as if it had set it, as
                    // the spec allows ("servers MAY choose to honour fixed newstyle"): its side of
                    // the protocol is the same, and hanging up on it would be a hard disconnect
                    // the spec does not provide for.
                    self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::Skip { remaining_bytes } => {
                    let take = remaining_bytes.min(rest.len() as u64);
                    consumed += take as usize;
                    if take < remaining_bytes {
                        self.state = State::Skip {
                            remaining_bytes: remaining_bytes - take,
                        };
                        return (consumed, Step::NeedMore);
                    }
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    let Some(header) = rest.first_chunk::<OPTION_HEADER_BYTES>() else {
                        return (consumed, Step::NeedMore);
                    };
                    if out.len() >= MAX_PENDING_REPLY_BYTES {
                        return (consumed, Step::Paused);
                    }
                    let magic = u64::from_be_bytes(header[0..8].try_into().unwrap());
                    let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
                    let length = u32::from_be_bytes(header[12..16].try_into().unwrap());
                    if magic != IHAVEOPT {
                        return (consumed, Step::Close(CloseReason::BadMagic(magic)));
                    }
                    self.options_seen += 1;
                    let limit = option_limit(exports.count());
                    if self.options_seen > limit {
                        return (consumed, Step::Close(CloseReason::TooManyOptions(limit)));
                    }
                    if option == OPT_SET_META_CONTEXT {
                        // Setting replaces the previous selection "including when this command
                        // fails": cleared here, before any way it can fail (too big, shutting
                        // down, malformed, unknown export).
                        self.meta = None;
                    }
                    if length > MAX_OPTION_BYTES {
                        consumed += OPTION_HEADER_BYTES;
                        if option == OPT_EXPORT_NAME {
                            // EXPORT_NAME has no error reply: the only answer is to hang up.
                            return (consumed, Step::Close(CloseReason::BadExportName));
                        }
                        if option == OPT_ABORT {
                            // ABORT is acknowledged whatever data it carries (the spec asks the
                            // server to ignore it).
                            option_reply(out, option, REP_ACK, &[]);
                            return (consumed, Step::Close(CloseReason::Aborted));
                        }
                        // An option the server does not know is unsupported whatever its size;
                        // one that takes no data is invalid with any (as the spec words it for
                        // each); only a known option with a payload is refused for being too
                        // big. While the server shuts down every option gets ERR_SHUTDOWN, as in
                        // `option`.
                        let (reply, msg) = if self.shutting_down {
                            (REP_ERR_SHUTDOWN, "server shutting down")
                        } else if takes_no_data(option) {
                            (REP_ERR_INVALID, "option takes no data")
                        } else if is_known_option(option) {
                            (REP_ERR_TOO_BIG, "option payload too long")
                        } else {
                            (REP_ERR_UNSUP, "unknown option")
                        };
                        option_reply_msg(out, option, reply, msg);
                        self.state = State::Skip {
                            remaining_bytes: u64::from(length),
                        };
                        continue;
                    }
                    let total = OPTION_HEADER_BYTES + length as usize;
                    if rest.len() < total {
                        return (consumed, Step::NeedMore);
                    }
                    consumed += total;
                    let data = &rest[OPTION_HEADER_BYTES..total];
                    if let Some(step) = self.option(option, data, exports, out) {
                        return (consumed, step);
                    }
                }
            }
        }
    }

    fn option<L: ExportLookup>(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &L,
        out: &mut Vec<u8>,
    ) -> Option<Step<L::Export>> {
        if self.shutting_down {
            return match option {
                OPT_ABORT => {
                    option_reply(out, option, REP_ACK, &[]);
                    Some(Step::Close(CloseReason::Aborted))
                }
                OPT_EXPORT_NAME => Some(Step::Close(CloseReason::ShuttingDown)),
                _ => {
                    option_reply_msg(out, option, REP_ERR_SHUTDOWN, "server shutting down");
                    None
                }
            };
        }
        // "The client MUST NOT send any additional data with the option, and the server SHOULD
        // reject a request that includes data with NBD_REP_ERR_INVALID" (each such option).
        if takes_no_data(option) && !data.is_empty() {
            option_reply_msg(out, option, REP_ERR_INVALID, "option takes no data");
            return None;
        }
        match option {
            OPT_EXPORT_NAME => Some(self.export_name(data, exports, out)),
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Some(Step::Close(CloseReason::Aborted))
            }
            OPT_LIST => {
                exports.for_each(&mut |name, _| {
                    let mut payload = Vec::with_capacity(4 + name.len());
                    payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    payload.extend_from_slice(name.as_bytes());
                    option_reply(out, option, REP_SERVER, &payload);
                });
                option_reply(out, option, REP_ACK, &[]);
                None
            }
            OPT_STARTTLS => {
                option_reply_msg(out, option, REP_ERR_UNSUP, "TLS is not supported yet");
                None
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, exports, out),
            OPT_STRUCTURED_REPLY => {
                if self.mode == ReplyMode::Extended {
                    option_reply_msg(
                        out,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else {
                    self.mode = ReplyMode::Structured;
                    option_reply(out, option, REP_ACK, &[]);
                }
                None
            }
            OPT_EXTENDED_HEADERS => {
                self.mode = ReplyMode::Extended;
                option_reply(out, option, REP_ACK, &[]);
                None
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports, out);
                None
            }
            _ => {
                option_reply_msg(out, option, REP_ERR_UNSUP, "unknown option");
                None
            }
        }
    }

    fn export_name<L: ExportLookup>(
        &mut self,
        data: &[u8],
        exports: &L,
        out: &mut Vec<u8>,
    ) -> Step<L::Export> {
        if self.mode == ReplyMode::Extended {
            return Step::Close(CloseReason::ExportNameAfterExtendedHeaders);
        }
        let Some(name) = parse_name(data) else {
            return Step::Close(CloseReason::BadExportName);
        };
        let Some((export, info)) = exports.lookup(name) else {
            return Step::Close(CloseReason::UnknownExport(name_for_message(name)));
        };
        let flags = transmission_flags(&info, self.mode);
        out.extend_from_slice(&info.size_bytes.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        // EXPORT_NAME carries no block sizes, so nothing was agreed: any alignment is served.
        Step::Transmission(self.finish(name, export, info, flags, false))
    }

    fn info_or_go<L: ExportLookup>(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &L,
        out: &mut Vec<u8>,
    ) -> Option<Step<L::Export>> {
        let mut cursor = Cursor(data);
        let parsed = (|| {
            let name = cursor.string()?;
            let count = cursor.u16()?;
            let mut requested = Vec::with_capacity(usize::from(count).min(16));
            for _ in 0..count {
                requested.push(cursor.u16()?);
            }
            cursor.is_empty().then_some((name, requested))
        })();
        let Some((name, requested)) = parsed else {
            option_reply_msg(
                out,
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/GO payload",
            );
            return None;
        };
        let Some((export, info)) = exports.lookup(name) else {
            let shown = name_for_message(name);
            option_reply_msg(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!("unknown export {shown}"),
            );
            self.unknown_export = Some(shown);
            return None;
        };
        let flags = transmission_flags(&info, self.mode);
        let mut payload = Vec::with_capacity(64);
        payload.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        payload.extend_from_slice(&info.size_bytes.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
        option_reply(out, option, REP_INFO, &payload);
        // Sent unasked: the name (clients that opened "" learn the real one), the description when
        // there is one or it was asked for, and the block sizes (the spec says servers SHOULD).
        payload.clear();
        payload.extend_from_slice(&INFO_NAME.to_be_bytes());
        payload.extend_from_slice(info.name.as_bytes());
        option_reply(out, option, REP_INFO, &payload);
        if !info.description.is_empty() || requested.contains(&INFO_DESCRIPTION) {
            payload.clear();
            payload.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            payload.extend_from_slice(info.description.as_bytes());
            option_reply(out, option, REP_INFO, &payload);
        }
        // The spec binds a client to the block sizes only when its GO asked for them. To a client
        // that did not ask, the minimum is 1 (the target serves any alignment, slower), so
        // whatever it sends is within what it was told; one that asked gets the real minimum and
        // an EINVAL for requests that break it. INFO answers as GO would for the same request
        // list: the spec says a GO right after a successful INFO with the same parameters MUST
        // get the same information.
        let agreed = requested.contains(&INFO_BLOCK_SIZE);
        let block_min = if agreed { info.block_min } else { 1 };
        payload.clear();
        payload.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        payload.extend_from_slice(&block_min.to_be_bytes());
        payload.extend_from_slice(&info.block_preferred.to_be_bytes());
        payload.extend_from_slice(&info.block_max.to_be_bytes());
        option_reply(out, option, REP_INFO, &payload);
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            let name = name.to_owned();
            return Some(Step::Transmission(
                self.finish(&name, export, info, flags, agreed),
            ));
        }
        None
    }

    fn meta_context<L: ExportLookup>(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &L,
        out: &mut Vec<u8>,
    ) {
        // A SET's previous selection was already cleared with its option header.
        let set = option == OPT_SET_META_CONTEXT;
        if self.mode == ReplyMode::Simple {
            option_reply_msg(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let mut cursor = Cursor(data);
        let parsed = (|| {
            let name = cursor.string()?;
            let count = cursor.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                queries.push(cursor.string()?);
            }
            cursor.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            option_reply_msg(
                out,
                option,
                REP_ERR_INVALID,
                "malformed meta context payload",
            );
            return;
        };
        if exports.lookup(name).is_none() {
            let shown = name_for_message(name);
            option_reply_msg(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!("unknown export {shown}"),
            );
            self.unknown_export = Some(shown);
            return;
        }
        let selected = if set {
            queries.contains(&META_BASE_ALLOCATION)
        } else {
            // Listing: no query lists everything; "base:" is the namespace wildcard.
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == META_BASE_ALLOCATION || *q == "base:")
        };
        if selected {
            let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
            let mut payload = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &payload);
        }
        option_reply(out, option, REP_ACK, &[]);
        if set {
            self.meta = Some((name.to_owned(), selected));
        }
    }

    fn finish<E>(
        &self,
        name: &str,
        export: E,
        info: ExportInfo,
        flags: u16,
        sizes_agreed: bool,
    ) -> Negotiated<E> {
        // Block status is only valid for the export the contexts were selected on.
        let base_allocation = self.mode != ReplyMode::Simple
            && matches!(&self.meta, Some((meta_name, true)) if meta_name == name);
        Negotiated {
            export_name: info.name.clone(),
            export,
            transmission_flags: flags,
            mode: self.mode,
            base_allocation,
            block_min: if sizes_agreed { info.block_min } else { 1 },
            sizes_agreed,
            info,
        }
    }
}

/// Transmission flags advertised for an export, truthfully: only what the server does.
pub fn transmission_flags(info: &ExportInfo, mode: ReplyMode) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA;
    if info.read_only {
        flags |= TF_READ_ONLY;
    } else {
        if info.can_trim {
            flags |= TF_SEND_TRIM;
        }
        if info.can_zero {
            flags |= TF_SEND_WRITE_ZEROES;
            if info.can_fast_zero {
                flags |= TF_SEND_FAST_ZERO;
            }
        }
    }
    if mode != ReplyMode::Simple {
        flags |= TF_SEND_DF;
    }
    if info.can_multi_conn {
        flags |= TF_CAN_MULTI_CONN;
    }
    if info.can_cache {
        flags |= TF_SEND_CACHE;
    }
    flags
}

/// Options that carry no data: any payload, of whatever size, gets `NBD_REP_ERR_INVALID`.
fn takes_no_data(option: u32) -> bool {
    matches!(
        option,
        OPT_LIST | OPT_STARTTLS | OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS
    )
}

/// Options this server implements (an answer other than `NBD_REP_ERR_UNSUP` is possible).
fn is_known_option(option: u32) -> bool {
    matches!(
        option,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_STARTTLS
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
            | OPT_EXTENDED_HEADERS
    )
}

fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An error reply carrying a human-readable message, as the spec allows for every error type,
/// kept within `MAX_MESSAGE_BYTES`.
fn option_reply_msg(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    option_reply(out, option, reply, bounded_message(message).as_bytes());
}

/// A name sent as the whole payload (`NBD_OPT_EXPORT_NAME`).
fn parse_name(data: &[u8]) -> Option<&str> {
    if data.len() > MAX_STRING_BYTES {
        return None;
    }
    std::str::from_utf8(data).ok()
}

/// Reads length-prefixed fields from an option payload; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    /// A 32-bit length followed by that many bytes of UTF-8.
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_BYTES {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    fn info() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            size_bytes: 1 << 30,
            description: "a disk".into(),
            read_only: false,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_cache: true,
            can_multi_conn: true,
            block_min: 1,
            block_preferred: 4096,
            block_max: 32 << 20,
        }
    }
    impl ExportLookup for Fixed {
        type Export = u32;
        fn lookup(&self, name: &str) -> Option<(u32, ExportInfo)> {
            if name == "direct" {
                // Served with O_DIRECT on a 4 KiB-sector disk.
                let mut i = info();
                i.name = name.into();
                i.block_min = 4096;
                return Some((8, i));
            }
            (name == "disk" || name.is_empty()).then(|| (7, info()))
        }
        fn for_each(&self, f: &mut dyn FnMut(&str, &str)) {
            f("disk", "a disk")
        }
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = opt_header(option, data.len() as u32);
        v.extend_from_slice(data);
        v
    }
    /// An option header that claims `claimed` payload bytes, none of them included.
    fn opt_header(option: u32, claimed: u32) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&claimed.to_be_bytes());
        v
    }
    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }
    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
    /// Splits option replies into (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut rest = out;
        while !rest.is_empty() {
            assert_eq!(
                u64::from_be_bytes(rest[0..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let o = u32::from_be_bytes(rest[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(rest[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            v.push((o, t, rest[20..20 + l].to_vec()));
            rest = &rest[20 + l..];
        }
        v
    }
    fn run(input: &[u8]) -> (usize, Step<u32>, Vec<u8>) {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        let (n, step) = h.advance(input, &Fixed, &mut out);
        (n, step, out)
    }
    fn flags(f: u32) -> Vec<u8> {
        f.to_be_bytes().to_vec()
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let mut out = Vec::new();
        Handshake::greeting(&mut out);
        assert_eq!(out.len(), 18);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([out[16], out[17]]), 3);
    }

    #[test]
    fn unknown_client_flags_close() {
        let (_, step, _) = run(&flags(0x80 | 1));
        assert!(matches!(
            step,
            Step::Close(CloseReason::UnknownClientFlags(_))
        ));
    }

    #[test]
    fn a_client_without_the_fixed_newstyle_flag_is_served_as_fixed_newstyle() {
        let mut input = flags(0);
        input.extend(opt(4242, b"x"));
        input.extend(opt(OPT_GO, &go_payload("disk", &[])));
        let (n, step, out) = run(&input);
        assert_eq!(n, input.len());
        assert!(matches!(step, Step::Transmission(_)), "{step:?}");
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
    }

    #[test]
    fn partial_input_waits_without_consuming_the_option() {
        let mut input = flags(3);
        let full = opt(OPT_GO, &go_payload("disk", &[]));
        input.extend_from_slice(&full[..full.len() - 1]);
        let (n, step, out) = run(&input);
        assert_eq!(n, 4);
        assert!(matches!(step, Step::NeedMore));
        assert!(out.is_empty());
    }

    #[test]
    fn go_sends_export_name_description_block_size_then_ack() {
        let mut input = flags(3);
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:allocation"]),
        ));
        input.extend(opt(OPT_GO, &go_payload("disk", &[INFO_BLOCK_SIZE])));
        input.extend_from_slice(b"tail");
        let (n, step, out) = run(&input);
        assert_eq!(
            n,
            input.len() - 4,
            "transmission bytes are left for the caller"
        );
        let Step::Transmission(neg) = step else {
            panic!("{step:?}")
        };
        assert_eq!(neg.export, 7);
        assert!(neg.base_allocation);
        assert_eq!(neg.mode, ReplyMode::Structured);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            [
                REP_ACK,
                REP_META_CONTEXT,
                REP_ACK,
                REP_INFO,
                REP_INFO,
                REP_INFO,
                REP_INFO,
                REP_ACK
            ]
        );
        let info_types: Vec<u16> = r[3..7]
            .iter()
            .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
            .collect();
        assert_eq!(
            info_types,
            [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
        );
        let tf = u16::from_be_bytes([r[3].2[10], r[3].2[11]]);
        assert_ne!(tf & TF_SEND_DF, 0);
        assert_ne!(tf & TF_CAN_MULTI_CONN, 0);
        assert_eq!(tf & TF_READ_ONLY, 0);
    }

    /// The minimum block size in the `NBD_INFO_BLOCK_SIZE` reply, and the one the client is
    /// held to, for one option on the "direct" export.
    fn block_sizes(option: u32, infos: &[u16]) -> (u32, Option<u32>) {
        let mut input = flags(3);
        input.extend(opt(option, &go_payload("direct", infos)));
        let (_, step, out) = run(&input);
        let advertised = replies(&out)
            .into_iter()
            .find(|r| r.1 == REP_INFO && r.2[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .map(|r| u32::from_be_bytes(r.2[2..6].try_into().unwrap()))
            .unwrap();
        let held = match step {
            Step::Transmission(neg) => Some(neg.block_min),
            _ => None,
        };
        (advertised, held)
    }

    #[test]
    fn only_a_client_that_asked_for_block_sizes_is_held_to_the_real_minimum() {
        // GO asking for them: the client MUST abide by them, so requests are checked.
        assert_eq!(block_sizes(OPT_GO, &[INFO_BLOCK_SIZE]), (4096, Some(4096)));
        // GO without asking: the client is not bound; it is told 1 and any alignment is served.
        assert_eq!(block_sizes(OPT_GO, &[]), (1, Some(1)));
        assert_eq!(block_sizes(OPT_GO, &[INFO_NAME]), (1, Some(1)));
        // INFO tells what GO with the same requests would (a MUST of the spec).
        assert_eq!(block_sizes(OPT_INFO, &[INFO_BLOCK_SIZE]), (4096, None));
        assert_eq!(block_sizes(OPT_INFO, &[]), (1, None));
        // EXPORT_NAME carries no block sizes at all.
        let mut input = flags(3);
        input.extend(opt(OPT_EXPORT_NAME, b"direct"));
        let Step::Transmission(neg) = run(&input).1 else {
            panic!("EXPORT_NAME did not start transmission")
        };
        assert_eq!(neg.block_min, 1);
    }

    #[test]
    fn meta_context_for_another_export_is_not_carried_into_go() {
        let mut input = flags(3);
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_payload("", &["base:allocation"]),
        ));
        input.extend(opt(OPT_GO, &go_payload("disk", &[])));
        let (_, step, _) = run(&input);
        let Step::Transmission(neg) = step else {
            panic!()
        };
        assert!(!neg.base_allocation);
    }

    #[test]
    fn an_oversized_set_meta_context_still_clears_the_selection() {
        // The spec: SET replaces the previous selection "including when this command fails".
        let mut input = flags(3);
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:allocation"]),
        ));
        let big = MAX_OPTION_BYTES as usize + 1;
        input.extend(opt_header(OPT_SET_META_CONTEXT, big as u32));
        input.extend(vec![0u8; big]);
        input.extend(opt(OPT_GO, &go_payload("disk", &[])));
        let (_, step, out) = run(&input);
        let Step::Transmission(neg) = step else {
            panic!("GO did not start transmission")
        };
        assert!(replies(&out).iter().any(|r| r.1 == REP_ERR_TOO_BIG));
        assert!(!neg.base_allocation);
    }

    #[test]
    fn option_error_messages_keep_to_the_string_limit() {
        // An unknown export name of the longest allowed length, in multibyte characters: the
        // message repeats the start of it, cut at a character boundary, and stays within the
        // 256 bytes the spec asks of strings.
        let name = "é".repeat(MAX_STRING_BYTES / 2);
        let mut input = flags(3);
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_INFO, &go_payload(&name, &[])));
        input.extend(opt(OPT_LIST_META_CONTEXT, &meta_payload(&name, &[])));
        let (_, _, out) = run(&input);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        for reply in &r[1..] {
            assert_eq!(reply.1, REP_ERR_UNKNOWN);
            let msg = std::str::from_utf8(&reply.2).unwrap();
            assert!(msg.len() <= MAX_MESSAGE_BYTES, "{}", msg.len());
            assert!(msg.contains("éé") && msg.ends_with("(4096 bytes)"), "{msg}");
        }
    }

    #[test]
    fn meta_context_needs_structured_replies() {
        let mut input = flags(3);
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:allocation"]),
        ));
        let (_, step, out) = run(&input);
        assert!(matches!(step, Step::NeedMore));
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn unknown_option_unsup_and_negotiation_continues() {
        let mut input = flags(3);
        input.extend(opt(99, b"whatever"));
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend(opt(OPT_INFO, &go_payload("nope", &[])));
        input.extend(opt(OPT_INFO, &go_payload("disk", &[])));
        let (n, step, out) = run(&input);
        assert_eq!(n, input.len());
        assert!(matches!(step, Step::NeedMore));
        let types: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(types[..3], [REP_ERR_UNSUP, REP_ERR_UNSUP, REP_ERR_UNKNOWN]);
        assert_eq!(*types.last().unwrap(), REP_ACK);
    }

    #[test]
    fn option_limit_grows_with_the_exports() {
        assert_eq!(option_limit(0), MAX_OPTIONS);
        assert_eq!(
            option_limit(2100),
            MAX_OPTIONS + 2100 * MAX_OPTIONS_PER_EXPORT
        );
        assert_eq!(option_limit(usize::MAX), u32::MAX);
        // One export here: the connection ends at the first option past the limit, and not before.
        let limit = option_limit(1);
        let mut input = flags(3);
        for _ in 0..=limit {
            input.extend(opt(99, &[]));
        }
        let mut h = Handshake::new();
        let (mut at, mut answered) = (0, 0);
        let step = loop {
            let mut out = Vec::new();
            let (n, step) = h.advance(&input[at..], &Fixed, &mut out);
            at += n;
            answered += replies(&out).len();
            if !matches!(step, Step::Paused) {
                break step;
            }
        };
        assert!(matches!(step, Step::Close(CloseReason::TooManyOptions(l)) if l == limit));
        assert_eq!(answered, limit as usize);
    }

    #[test]
    fn huge_payload_on_an_option_that_takes_none_is_invalid() {
        // "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID", at
        // any size; negotiation goes on after the payload is skipped.
        for option in [
            OPT_LIST,
            OPT_STARTTLS,
            OPT_STRUCTURED_REPLY,
            OPT_EXTENDED_HEADERS,
        ] {
            let big = MAX_OPTION_BYTES as usize + 1;
            let mut input = flags(3);
            input.extend(opt_header(option, big as u32));
            input.extend(vec![0u8; big]);
            input.extend(opt(OPT_INFO, &go_payload("disk", &[])));
            let (n, step, out) = run(&input);
            assert_eq!(n, input.len());
            assert!(matches!(step, Step::NeedMore));
            let r = replies(&out);
            assert_eq!(
                (r[0].0, r[0].1),
                (option, REP_ERR_INVALID),
                "option {option}"
            );
            assert_eq!(r.last().unwrap().1, REP_ACK);
        }
    }

    #[test]
    fn huge_option_is_refused_and_skipped_without_buffering() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        let mut input = flags(3);
        input.extend(opt_header(OPT_INFO, 1 << 30));
        input.extend_from_slice(&[0u8; 100]);
        let (n, step) = h.advance(&input, &Fixed, &mut out);
        assert_eq!(n, input.len(), "payload bytes are discarded as they come");
        assert!(matches!(step, Step::NeedMore));
        assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
        assert_eq!(
            h.state,
            State::Skip {
                remaining_bytes: (1 << 30) - 100
            }
        );
    }

    #[test]
    fn huge_unknown_option_is_unsupported_and_huge_abort_is_acknowledged() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        let mut input = flags(3);
        input.extend(opt_header(4242, 1 << 20));
        input.extend_from_slice(&vec![0u8; 1 << 20]);
        input.extend(opt_header(OPT_ABORT, 1 << 20));
        let (_, step) = h.advance(&input, &Fixed, &mut out);
        assert!(
            matches!(step, Step::Close(CloseReason::Aborted)),
            "{step:?}"
        );
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (4242, REP_ERR_UNSUP));
        assert_eq!((r[1].0, r[1].1), (OPT_ABORT, REP_ACK));
    }

    #[test]
    fn shutting_down_answers_options_with_err_shutdown() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        let (_, step) = h.advance(&flags(3), &Fixed, &mut out);
        assert!(matches!(step, Step::NeedMore));
        h.shut_down();
        let mut input = opt(OPT_GO, &go_payload("disk", &[]));
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(OPT_ABORT, &[]));
        let (_, step) = h.advance(&input, &Fixed, &mut out);
        assert!(
            matches!(step, Step::Close(CloseReason::Aborted)),
            "{step:?}"
        );
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(types, [REP_ERR_SHUTDOWN, REP_ERR_SHUTDOWN, REP_ACK]);
    }

    #[test]
    fn shutting_down_answers_an_oversized_option_with_err_shutdown() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        h.advance(&flags(3), &Fixed, &mut out);
        h.shut_down();
        let (_, step) = h.advance(&opt_header(OPT_GO, 1 << 20), &Fixed, &mut out);
        assert!(matches!(step, Step::NeedMore));
        assert_eq!(replies(&out)[0].1, REP_ERR_SHUTDOWN);
    }

    #[test]
    fn malformed_go_is_invalid() {
        let mut input = flags(3);
        let mut p = go_payload("disk", &[1]);
        p.push(0); // trailing byte
        input.extend(opt(OPT_GO, &p));
        input.extend(opt(OPT_GO, &100u32.to_be_bytes())); // name longer than payload
        let (_, step, out) = run(&input);
        assert!(matches!(step, Step::NeedMore));
        let types: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(types, [REP_ERR_INVALID, REP_ERR_INVALID]);
    }

    #[test]
    fn export_name_pads_unless_no_zeroes() {
        let mut input = flags(1);
        input.extend(opt(OPT_EXPORT_NAME, b"disk"));
        let (_, step, out) = run(&input);
        assert!(matches!(step, Step::Transmission(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
        let mut input = flags(3);
        input.extend(opt(OPT_EXPORT_NAME, b"disk"));
        let (_, _, out) = run(&input);
        assert_eq!(out.len(), 10);
        let mut input = flags(3);
        input.extend(opt(OPT_EXPORT_NAME, b"missing"));
        let (_, step, _) = run(&input);
        assert!(matches!(step, Step::Close(CloseReason::UnknownExport(_))));
    }

    #[test]
    fn extended_headers_refuse_downgrade_and_export_name() {
        let mut input = flags(3);
        input.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_EXPORT_NAME, b"disk"));
        let (_, step, out) = run(&input);
        let types: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(types, [REP_ACK, REP_ERR_EXT_HEADER_REQD]);
        assert!(matches!(
            step,
            Step::Close(CloseReason::ExportNameAfterExtendedHeaders)
        ));
    }

    #[test]
    fn list_and_list_meta_context() {
        let mut input = flags(3);
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_LIST_META_CONTEXT, &meta_payload("disk", &[])));
        input.extend(opt(
            OPT_LIST_META_CONTEXT,
            &meta_payload("disk", &["qemu:"]),
        ));
        let (_, _, out) = run(&input);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            [
                REP_SERVER,
                REP_ACK,
                REP_ACK,
                REP_META_CONTEXT,
                REP_ACK,
                REP_ACK
            ]
        );
        assert_eq!(&r[0].2[4..], b"disk");
        assert_eq!(&r[3].2[4..], META_BASE_ALLOCATION.as_bytes());
    }

    #[test]
    fn abort_acks_then_closes() {
        let mut input = flags(3);
        input.extend(opt(OPT_ABORT, &[]));
        let (_, step, out) = run(&input);
        assert!(matches!(step, Step::Close(CloseReason::Aborted)));
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    /// Options whose replies pile up unsent are left in the input until the output drains, then
    /// answered in order: none lost, none answered twice.
    #[test]
    fn pending_replies_pause_the_options() {
        let options = 4000;
        let mut input = flags(3);
        for _ in 0..options {
            input.extend(opt(OPT_LIST, &[]));
        }
        let mut h = Handshake::new();
        let (mut at, mut rounds, mut answered) = (0, 0, 0);
        loop {
            let mut out = Vec::new();
            let (n, step) = h.advance(&input[at..], &Fixed, &mut out);
            let last = at + n == input.len();
            assert!(
                matches!(step, Step::Paused) != last,
                "{step:?} with {} bytes left",
                input.len() - at - n
            );
            // One reply (SERVER + ACK for the one export) past the limit at most.
            assert!(
                out.len() < MAX_PENDING_REPLY_BYTES + 64,
                "{} bytes",
                out.len()
            );
            let r = replies(&out);
            assert!(
                r.chunks(2)
                    .all(|p| p[0].1 == REP_SERVER && p[1].1 == REP_ACK)
            );
            answered += r.len() / 2;
            at += n;
            rounds += 1;
            if at == input.len() {
                break;
            }
            assert!(n > 0, "no progress with {} bytes left", input.len() - at);
        }
        assert_eq!(answered, options);
        assert!(rounds > 1, "the replies never reached the limit");
    }

    #[test]
    fn bad_option_magic_closes() {
        let mut input = flags(3);
        input.extend_from_slice(&[0xAA; 16]);
        let (_, step, _) = run(&input);
        assert!(matches!(step, Step::Close(CloseReason::BadMagic(_))));
    }
}
