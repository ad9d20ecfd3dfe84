//! The Sendmail milter wire format, version 6: packets, the commands an
//! MTA sends, and the replies a milter sends back. Pure: bytes in, typed
//! values out, no I/O.
//!
//! Every packet is a 4-byte big-endian length (counting the command byte
//! and the data), one command byte, then the data. Strings are
//! NUL-terminated; numbers are 32-bit big-endian ("host long" in
//! libmilter's words), except the client port, which is 16 bits.
//!
//! Decoding never panics and never allocates more than the packet it was
//! given: the caller reads a length with [`packet_len`], which refuses
//! anything over its limit before a byte of data is read.

use std::net::SocketAddr;

/// The protocol version letterbox speaks: Sendmail 8.14's, as Postfix does.
pub const VERSION: u32 = 6;

/// The largest body chunk one `B` packet carries. libmilter's
/// `MILTER_CHUNK_SIZE`; milters that did not negotiate bigger buffers
/// (letterbox never offers them) refuse more.
pub const MAX_BODY_CHUNK: usize = 65535;

/// Default cap on one reply packet. A milter's replies are small except
/// body replacement chunks, which libmilter cuts at [`MAX_BODY_CHUNK`]
/// unless bigger buffers were negotiated; 1 MiB leaves room for both.
pub const MAX_REPLY_PACKET: usize = 1 << 20;

/// Command bytes the MTA sends (`SMFIC_*`).
pub mod cmd {
    /// Abort the current message; the connection stays.
    pub const ABORT: u8 = b'A';
    /// One body chunk.
    pub const BODY: u8 = b'B';
    /// The client's connection: name, address family, port, address.
    pub const CONNECT: u8 = b'C';
    /// Macro definitions for the command named in the first data byte.
    pub const MACRO: u8 = b'D';
    /// End of the message body: the milter answers with its edits and verdict.
    pub const END_OF_MESSAGE: u8 = b'E';
    /// The HELO/EHLO argument.
    pub const HELO: u8 = b'H';
    /// One header field: name and value.
    pub const HEADER: u8 = b'L';
    /// MAIL FROM: the reverse-path and its ESMTP parameters.
    pub const MAIL: u8 = b'M';
    /// End of the header section.
    pub const END_OF_HEADERS: u8 = b'N';
    /// Option negotiation: version, actions, protocol flags.
    pub const OPTNEG: u8 = b'O';
    /// Close the milter connection.
    pub const QUIT: u8 = b'Q';
    /// RCPT TO: the forward-path and its ESMTP parameters.
    pub const RCPT: u8 = b'R';
    /// The DATA command (protocol version 4 and later).
    pub const DATA: u8 = b'T';
    /// An SMTP command the MTA did not recognise (never sent by letterbox).
    pub const UNKNOWN: u8 = b'U';
}

/// Reply bytes a milter sends (`SMFIR_*`).
pub mod reply {
    /// Add a recipient (`SMFIR_ADDRCPT`).
    pub const ADD_RCPT: u8 = b'+';
    /// Delete a recipient (`SMFIR_DELRCPT`).
    pub const DEL_RCPT: u8 = b'-';
    /// Add a recipient with ESMTP parameters (`SMFIR_ADDRCPT_PAR`).
    pub const ADD_RCPT_PAR: u8 = b'2';
    /// Answer 421 and close the SMTP connection (`SMFIR_SHUTDOWN`).
    pub const SHUTDOWN: u8 = b'4';
    /// Accept (`SMFIR_ACCEPT`).
    pub const ACCEPT: u8 = b'a';
    /// One chunk of a replacement body (`SMFIR_REPLBODY`).
    pub const REPL_BODY: u8 = b'b';
    /// Go on (`SMFIR_CONTINUE`).
    pub const CONTINUE: u8 = b'c';
    /// Accept and drop the message (`SMFIR_DISCARD`).
    pub const DISCARD: u8 = b'd';
    /// Replace the sender (`SMFIR_CHGFROM`).
    pub const CHG_FROM: u8 = b'e';
    /// Fail the SMTP connection (`SMFIR_CONN_FAIL`).
    pub const CONN_FAIL: u8 = b'f';
    /// Append a header field (`SMFIR_ADDHEADER`).
    pub const ADD_HEADER: u8 = b'h';
    /// Insert a header field (`SMFIR_INSHEADER`).
    pub const INS_HEADER: u8 = b'i';
    /// A macro list for one stage (`SMFIR_SETSYMLIST`).
    pub const SET_SYMLIST: u8 = b'l';
    /// Change or delete a header field (`SMFIR_CHGHEADER`).
    pub const CHG_HEADER: u8 = b'm';
    /// Still working (`SMFIR_PROGRESS`).
    pub const PROGRESS: u8 = b'p';
    /// Quarantine the message (`SMFIR_QUARANTINE`).
    pub const QUARANTINE: u8 = b'q';
    /// Reject (`SMFIR_REJECT`).
    pub const REJECT: u8 = b'r';
    /// Skip further events of this kind (`SMFIR_SKIP`).
    pub const SKIP: u8 = b's';
    /// Fail temporarily (`SMFIR_TEMPFAIL`).
    pub const TEMPFAIL: u8 = b't';
    /// Refuse with this SMTP reply (`SMFIR_REPLYCODE`).
    pub const REPLY_CODE: u8 = b'y';
    /// The negotiation reply reuses the command byte.
    pub const OPTNEG: u8 = b'O';
}

/// What a milter may ask the MTA to change (`SMFIF_*`), negotiated once
/// per connection. A modification outside the negotiated set is a
/// protocol violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Actions(pub u32);

impl Actions {
    /// Add header fields (`h`).
    pub const ADD_HEADERS: u32 = 1 << 0;
    /// Replace the body (`b`).
    pub const CHANGE_BODY: u32 = 1 << 1;
    /// Add recipients (`+`).
    pub const ADD_RCPT: u32 = 1 << 2;
    /// Delete recipients (`-`).
    pub const DEL_RCPT: u32 = 1 << 3;
    /// Change, delete or insert header fields (`m`, `i`).
    pub const CHANGE_HEADERS: u32 = 1 << 4;
    /// Quarantine the message (`q`).
    pub const QUARANTINE: u32 = 1 << 5;
    /// Replace the sender (`e`).
    pub const CHANGE_FROM: u32 = 1 << 6;
    /// Add recipients with ESMTP parameters (`2`).
    pub const ADD_RCPT_PAR: u32 = 1 << 7;
    /// Send its own lists of wanted macros in the negotiation reply.
    pub const SET_SYMLIST: u32 = 1 << 8;
    /// Everything letterbox offers: all of the above, as Postfix does.
    pub const ALL: Actions = Actions(0x1ff);

    /// Whether every bit of `flag` is set.
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag == flag
    }
}

/// Protocol flags (`SMFIP_*`): the stages a milter does not want to see
/// (`NO_*`), the stages it will not answer (`NR_*`), and a few extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProtocolFlags(pub u32);

impl ProtocolFlags {
    /// Do not send the connect stage.
    pub const NO_CONNECT: u32 = 1 << 0;
    /// Do not send HELO.
    pub const NO_HELO: u32 = 1 << 1;
    /// Do not send MAIL.
    pub const NO_MAIL: u32 = 1 << 2;
    /// Do not send RCPT.
    pub const NO_RCPT: u32 = 1 << 3;
    /// Do not send body chunks.
    pub const NO_BODY: u32 = 1 << 4;
    /// Do not send header fields.
    pub const NO_HEADERS: u32 = 1 << 5;
    /// Do not send the end of headers.
    pub const NO_EOH: u32 = 1 << 6;
    /// No reply per header (Sendmail 8.13's `SMFIP_NOHREPL`).
    pub const NR_HEADER: u32 = 1 << 7;
    /// Do not send unknown SMTP commands.
    pub const NO_UNKNOWN: u32 = 1 << 8;
    /// Do not send DATA.
    pub const NO_DATA: u32 = 1 << 9;
    /// The MTA understands `s` (skip the rest of the body).
    pub const SKIP: u32 = 1 << 10;
    /// The milter wants rejected recipients too (letterbox never offers it).
    pub const RCPT_REJ: u32 = 1 << 11;
    /// No reply to the connect stage.
    pub const NR_CONNECT: u32 = 1 << 12;
    /// No reply to HELO.
    pub const NR_HELO: u32 = 1 << 13;
    /// No reply to MAIL.
    pub const NR_MAIL: u32 = 1 << 14;
    /// No reply to RCPT.
    pub const NR_RCPT: u32 = 1 << 15;
    /// No reply to DATA.
    pub const NR_DATA: u32 = 1 << 16;
    /// No reply to unknown commands.
    pub const NR_UNKNOWN: u32 = 1 << 17;
    /// No reply to the end of headers.
    pub const NR_EOH: u32 = 1 << 18;
    /// No reply to body chunks.
    pub const NR_BODY: u32 = 1 << 19;
    /// Header values keep their leading space, both ways.
    pub const HEADER_LEADING_SPACE: u32 = 1 << 20;

    /// What letterbox offers: every skip and no-reply flag, `SKIP` and
    /// leading spaces; not `RCPT_REJ`, since only accepted recipients are
    /// reported.
    pub const OFFERED: ProtocolFlags = ProtocolFlags(0x1f_ffff & !Self::RCPT_REJ);

    /// Whether every bit of `flag` is set.
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag == flag
    }
}

/// The stages a milter can ask macros for, by their number in the
/// negotiation reply (`SMFIM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MacroStage {
    /// Sent with the client's connection (`SMFIM_CONNECT`).
    Connect = 0,
    /// Sent with HELO/EHLO.
    Helo = 1,
    /// Sent with MAIL FROM.
    Mail = 2,
    /// Sent with each RCPT TO.
    Rcpt = 3,
    /// Sent with DATA.
    Data = 4,
    /// Sent with the end of the message.
    EndOfMessage = 5,
    /// Sent with the end of the headers.
    EndOfHeaders = 6,
}

impl MacroStage {
    /// Every stage, by number.
    pub const ALL: [MacroStage; 7] = [
        MacroStage::Connect,
        MacroStage::Helo,
        MacroStage::Mail,
        MacroStage::Rcpt,
        MacroStage::Data,
        MacroStage::EndOfMessage,
        MacroStage::EndOfHeaders,
    ];

    /// The stage with protocol number `n`.
    pub fn from_number(n: u32) -> Option<MacroStage> {
        Self::ALL.get(n as usize).copied()
    }

    /// The command whose macros these are: the first byte of a `D` packet.
    pub fn command(self) -> u8 {
        match self {
            MacroStage::Connect => cmd::CONNECT,
            MacroStage::Helo => cmd::HELO,
            MacroStage::Mail => cmd::MAIL,
            MacroStage::Rcpt => cmd::RCPT,
            MacroStage::Data => cmd::DATA,
            MacroStage::EndOfMessage => cmd::END_OF_MESSAGE,
            MacroStage::EndOfHeaders => cmd::END_OF_HEADERS,
        }
    }
}

/// The client's address as the `C` packet carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAddress {
    /// IPv4 or IPv6, with the client's port (family `4` or `6`).
    Inet(SocketAddr),
    /// A local socket, by path (family `L`, port 0).
    Unix(String),
    /// Unknown: only the family byte `U` follows the host name.
    Unknown,
}

/// One command from the MTA to the milter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// Opens the conversation: what the MTA speaks and allows.
    OptNeg {
        /// The highest protocol version the MTA speaks.
        version: u32,
        /// The modifications the MTA can carry out.
        actions: Actions,
        /// The protocol flags the milter may choose from.
        protocol: ProtocolFlags,
    },
    /// Macro values for the command `stage` that follows.
    Macros {
        /// The stage they belong to.
        stage: MacroStage,
        /// Name and value pairs; names of more than one letter in braces.
        pairs: &'a [(String, String)],
    },
    /// The client connection: host name (or `[address]`) and address.
    Connect {
        /// The verified client name, or `[address]` when there is none.
        hostname: &'a str,
        /// Family, port and address.
        address: &'a ClientAddress,
    },
    /// The HELO/EHLO argument.
    Helo(&'a str),
    /// The reverse-path as written in MAIL FROM (`<a@b>`) and its parameters.
    Mail {
        /// `<address>`, brackets included.
        sender: &'a str,
        /// ESMTP parameters, one string each.
        args: &'a [String],
    },
    /// The forward-path as written in RCPT TO and its parameters.
    Rcpt {
        /// `<address>`, brackets included.
        recipient: &'a str,
        /// ESMTP parameters, one string each.
        args: &'a [String],
    },
    /// The DATA command.
    Data,
    /// One header field; the value as the milter negotiated to see it.
    Header {
        /// The field name, without the colon.
        name: &'a str,
        /// The field value; folded lines joined by LF.
        value: &'a str,
    },
    /// End of the header section.
    EndOfHeaders,
    /// One chunk of body, at most [`MAX_BODY_CHUNK`] bytes.
    Body(&'a [u8]),
    /// End of the message: ask for edits and the verdict.
    EndOfMessage,
    /// Forget the current message.
    Abort,
    /// Close the connection.
    Quit,
}

/// Why a command cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string would be cut short by its own NUL.
    #[error("{what} contains a NUL byte")]
    Nul {
        /// Which string.
        what: &'static str,
    },
    /// A body chunk over [`MAX_BODY_CHUNK`].
    #[error("body chunk of {0} bytes exceeds {MAX_BODY_CHUNK}")]
    ChunkTooLarge(usize),
}

impl Command<'_> {
    /// The command byte.
    pub fn code(&self) -> u8 {
        match self {
            Command::OptNeg { .. } => cmd::OPTNEG,
            Command::Macros { .. } => cmd::MACRO,
            Command::Connect { .. } => cmd::CONNECT,
            Command::Helo(_) => cmd::HELO,
            Command::Mail { .. } => cmd::MAIL,
            Command::Rcpt { .. } => cmd::RCPT,
            Command::Data => cmd::DATA,
            Command::Header { .. } => cmd::HEADER,
            Command::EndOfHeaders => cmd::END_OF_HEADERS,
            Command::Body(_) => cmd::BODY,
            Command::EndOfMessage => cmd::END_OF_MESSAGE,
            Command::Abort => cmd::ABORT,
            Command::Quit => cmd::QUIT,
        }
    }

    /// Appends the whole packet (length, command byte, data) to `out`. On
    /// error `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, self.code()]);
        if let Err(e) = self.encode_data(out) {
            out.truncate(start);
            return Err(e);
        }
        // Data sizes are bounded by what the caller holds in memory; a
        // packet over 4 GiB cannot be built from a chunk of 64 KiB or
        // from strings an SMTP line limit already bounded.
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    fn encode_data(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Command::OptNeg {
                version,
                actions,
                protocol,
            } => {
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&actions.0.to_be_bytes());
                out.extend_from_slice(&protocol.0.to_be_bytes());
            }
            Command::Macros { stage, pairs } => {
                out.push(stage.command());
                for (name, value) in pairs.iter() {
                    put_str(out, name, "macro name")?;
                    put_str(out, value, "macro value")?;
                }
            }
            Command::Connect { hostname, address } => {
                put_str(out, hostname, "client host name")?;
                match address {
                    ClientAddress::Inet(sa) => {
                        out.push(if sa.is_ipv4() { b'4' } else { b'6' });
                        out.extend_from_slice(&sa.port().to_be_bytes());
                        put_str(out, &sa.ip().to_string(), "client address")?;
                    }
                    ClientAddress::Unix(path) => {
                        out.push(b'L');
                        out.extend_from_slice(&0u16.to_be_bytes());
                        put_str(out, path, "client socket path")?;
                    }
                    ClientAddress::Unknown => out.push(b'U'),
                }
            }
            Command::Helo(name) => put_str(out, name, "HELO name")?,
            Command::Mail { sender, args } => {
                put_str(out, sender, "sender")?;
                for a in args.iter() {
                    put_str(out, a, "MAIL parameter")?;
                }
            }
            Command::Rcpt { recipient, args } => {
                put_str(out, recipient, "recipient")?;
                for a in args.iter() {
                    put_str(out, a, "RCPT parameter")?;
                }
            }
            Command::Header { name, value } => {
                put_str(out, name, "header name")?;
                put_str(out, value, "header value")?;
            }
            Command::Body(chunk) => {
                if chunk.len() > MAX_BODY_CHUNK {
                    return Err(EncodeError::ChunkTooLarge(chunk.len()));
                }
                out.extend_from_slice(chunk);
            }
            Command::Data
            | Command::EndOfHeaders
            | Command::EndOfMessage
            | Command::Abort
            | Command::Quit => {}
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), EncodeError> {
    if s.as_bytes().contains(&0) {
        return Err(EncodeError::Nul { what });
    }
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Ok(())
}

/// The milter's answer to [`Command::OptNeg`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    /// The protocol version the milter speaks (2 to 6).
    pub version: u32,
    /// The modifications it may ask for.
    pub actions: Actions,
    /// The stages it skips or will not answer, and extensions it wants.
    pub protocol: ProtocolFlags,
    /// Macro lists that replace the MTA's defaults, per stage, each a
    /// space-separated list of names as sent (`{auth_authen} i`).
    pub macros: Vec<(MacroStage, String)>,
}

/// An SMTP reply a milter chose (`y`), already checked to be a well-formed
/// 4xx or 5xx reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// The three-digit code, 400 to 599.
    pub code: u16,
    /// The RFC 3463 enhanced status (`5.7.1`) when the reply has one.
    pub enhanced: Option<String>,
    /// The text of every line, without code and status, joined by `\n`.
    pub text: String,
}

/// One packet from the milter, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `O`: the negotiation answer.
    Negotiate(Negotiation),
    /// `a`: accept; no more events for this message (or, at connect and
    /// HELO, for the connection).
    Accept,
    /// `c`: go on.
    Continue,
    /// `d`: accept and silently drop the message.
    Discard,
    /// `r`: reject (the MTA says `550 5.7.1`).
    Reject,
    /// `t`: temporary failure (the MTA says `451 4.7.1`).
    TempFail,
    /// `y`: reject or temporary failure with the milter's own reply.
    ReplyCode(SmtpReply),
    /// `4`: answer 421 and close the SMTP connection.
    Shutdown,
    /// `f`: make the SMTP connection fail (Sendmail internal; treated as
    /// [`Reply::Shutdown`]).
    ConnFail,
    /// `s`: send no more events of this kind (body chunks).
    Skip,
    /// `p`: still working; restarts the MTA's timer.
    Progress,
    /// `q`: quarantine (hold) the message, with a reason.
    Quarantine(String),
    /// `h`: append a header field.
    AddHeader {
        /// The field name.
        name: String,
        /// The value as sent (see [`ProtocolFlags::HEADER_LEADING_SPACE`]).
        value: String,
    },
    /// `i`: insert a header field at `index` (0 = first).
    InsertHeader {
        /// Where: before the `index`-th field, 0 being the top.
        index: u32,
        /// The field name.
        name: String,
        /// The value as sent.
        value: String,
    },
    /// `m`: change the `index`-th (1-based) field called `name`; an empty
    /// value deletes it.
    ChangeHeader {
        /// Which occurrence of `name`, from 1 (0 is taken as 1).
        index: u32,
        /// The field name.
        name: String,
        /// The new value; empty to delete the field.
        value: String,
    },
    /// `b`: one chunk of a replacement body (chunks concatenate).
    ReplaceBody(Vec<u8>),
    /// `+`: add a recipient.
    AddRcpt(String),
    /// `2`: add a recipient with ESMTP parameters.
    AddRcptPar {
        /// The recipient, usually in angle brackets.
        rcpt: String,
        /// ESMTP parameters, if any.
        args: Option<String>,
    },
    /// `-`: delete a recipient.
    DelRcpt(String),
    /// `e`: replace the sender, with optional ESMTP parameters.
    ChangeFrom {
        /// The new sender, usually in angle brackets.
        sender: String,
        /// ESMTP parameters, if any.
        args: Option<String>,
    },
    /// `l`: a macro list for one stage (only valid inside negotiation).
    SetSymList {
        /// The stage.
        stage: MacroStage,
        /// Space-separated macro names.
        macros: String,
    },
}

/// Why bytes from a milter are not a valid reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A length of zero: not even a command byte.
    #[error("empty packet")]
    Empty,
    /// A length over the caller's cap.
    #[error("packet of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The length the packet claims.
        len: usize,
        /// The caller's cap.
        max: usize,
    },
    /// A command byte no milter sends.
    #[error("unknown reply {0:?}")]
    UnknownReply(char),
    /// Data where none belongs, or missing where it must be.
    #[error("reply {reply:?}: {why}")]
    Malformed {
        /// The reply's command byte.
        reply: char,
        /// What is wrong.
        why: &'static str,
    },
    /// A `y` reply that is no 4xx/5xx SMTP reply.
    #[error("reply code is not a 4xx or 5xx SMTP reply: {0:?}")]
    BadReplyCode(String),
}

/// Reads a packet's length from its first 4 bytes and checks it against
/// `max`: the number of bytes (command byte included) still to read.
pub fn packet_len(header: [u8; 4], max: usize) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(len)
}

/// Splits one whole packet off the front of `buf`, if one is there:
/// `Ok(None)` asks for more bytes, `Ok(Some((reply, used)))` says how many
/// bytes it took. For byte streams in any chunking.
pub fn decode_packet(buf: &[u8], max: usize) -> Result<Option<(Reply, usize)>, DecodeError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let len = packet_len([header[0], header[1], header[2], header[3]], max)?;
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode(body[0], &body[1..])?, 4 + len)))
}

/// Decodes one reply from its command byte and data.
pub fn decode(code: u8, data: &[u8]) -> Result<Reply, DecodeError> {
    let malformed = |why| DecodeError::Malformed {
        reply: code as char,
        why,
    };
    let empty = |r: Reply| {
        if data.is_empty() {
            Ok(r)
        } else {
            Err(malformed("unexpected data"))
        }
    };
    let mut d = Data { rest: data };
    let reply = match code {
        reply::ACCEPT => return empty(Reply::Accept),
        reply::CONTINUE => return empty(Reply::Continue),
        reply::DISCARD => return empty(Reply::Discard),
        reply::REJECT => return empty(Reply::Reject),
        reply::TEMPFAIL => return empty(Reply::TempFail),
        reply::SHUTDOWN => return empty(Reply::Shutdown),
        reply::CONN_FAIL => return empty(Reply::ConnFail),
        reply::SKIP => return empty(Reply::Skip),
        reply::PROGRESS => return empty(Reply::Progress),
        reply::REPL_BODY => return Ok(Reply::ReplaceBody(data.to_vec())),
        reply::OPTNEG => {
            let version = d.u32().ok_or(malformed("short negotiation"))?;
            let actions = Actions(d.u32().ok_or(malformed("short negotiation"))?);
            let protocol = ProtocolFlags(d.u32().ok_or(malformed("short negotiation"))?);
            let mut macros = Vec::new();
            while !d.rest.is_empty() {
                let n = d.u32().ok_or(malformed("short macro list"))?;
                let list = d.string().ok_or(malformed("unterminated macro list"))?;
                // Postfix ignores unknown stages; so does letterbox.
                if let Some(stage) = MacroStage::from_number(n) {
                    macros.push((stage, list));
                }
            }
            Reply::Negotiate(Negotiation {
                version,
                actions,
                protocol,
                macros,
            })
        }
        reply::SET_SYMLIST => {
            let n = d.u32().ok_or(malformed("short macro list"))?;
            let stage = MacroStage::from_number(n).ok_or(malformed("unknown macro stage"))?;
            let macros = d.string().ok_or(malformed("unterminated macro list"))?;
            Reply::SetSymList { stage, macros }
        }
        reply::REPLY_CODE => {
            // The text is NUL-terminated; tolerate a missing terminator.
            let text = data.strip_suffix(&[0]).unwrap_or(data);
            return parse_smtp_reply(text).map(Reply::ReplyCode);
        }
        reply::QUARANTINE => Reply::Quarantine(d.string().ok_or(malformed("unterminated reason"))?),
        reply::ADD_HEADER => {
            let name = d.string().ok_or(malformed("unterminated header name"))?;
            let value = d.string().ok_or(malformed("unterminated header value"))?;
            Reply::AddHeader { name, value }
        }
        reply::INS_HEADER | reply::CHG_HEADER => {
            let index = d.u32().ok_or(malformed("missing header index"))?;
            let name = d.string().ok_or(malformed("unterminated header name"))?;
            let value = d.string().ok_or(malformed("unterminated header value"))?;
            if name.is_empty() {
                return Err(malformed("empty header name"));
            }
            if code == reply::INS_HEADER {
                Reply::InsertHeader { index, name, value }
            } else {
                Reply::ChangeHeader { index, name, value }
            }
        }
        reply::ADD_RCPT => Reply::AddRcpt(d.string().ok_or(malformed("unterminated recipient"))?),
        reply::DEL_RCPT => Reply::DelRcpt(d.string().ok_or(malformed("unterminated recipient"))?),
        reply::ADD_RCPT_PAR => {
            let rcpt = d.string().ok_or(malformed("unterminated recipient"))?;
            let args = d
                .optional_string()
                .ok_or(malformed("unterminated parameters"))?;
            Reply::AddRcptPar { rcpt, args }
        }
        reply::CHG_FROM => {
            let sender = d.string().ok_or(malformed("unterminated sender"))?;
            let args = d
                .optional_string()
                .ok_or(malformed("unterminated parameters"))?;
            Reply::ChangeFrom { sender, args }
        }
        other => return Err(DecodeError::UnknownReply(other as char)),
    };
    if d.rest.is_empty() {
        Ok(reply)
    } else {
        Err(malformed("trailing data"))
    }
}

/// A cursor over a reply's data.
struct Data<'a> {
    rest: &'a [u8],
}

impl Data<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (n, rest) = self.rest.split_first_chunk::<4>()?;
        self.rest = rest;
        Some(u32::from_be_bytes(*n))
    }

    /// A NUL-terminated string; bytes that are not UTF-8 become U+FFFD
    /// (milters send ASCII; a stray Latin-1 byte is no reason to fail
    /// the message).
    fn string(&mut self) -> Option<String> {
        let end = self.rest.iter().position(|&b| b == 0)?;
        let s = String::from_utf8_lossy(&self.rest[..end]).into_owned();
        self.rest = &self.rest[end + 1..];
        Some(s)
    }

    /// Nothing at all, or one NUL-terminated string.
    fn optional_string(&mut self) -> Option<Option<String>> {
        if self.rest.is_empty() {
            Some(None)
        } else {
            self.string().map(Some)
        }
    }
}

/// Checks a `y` reply the way Postfix does (every line `4dd`/`5dd`, `-`
/// between lines, CRLF line ends, a matching first status digit) and
/// splits it into code, enhanced status and text. Sendmail treats the
/// text as a format string, so `%%` stands for `%`; a lone `%` is dropped.
pub fn parse_smtp_reply(raw: &[u8]) -> Result<SmtpReply, DecodeError> {
    let bad = || DecodeError::BadReplyCode(String::from_utf8_lossy(raw).into_owned());
    let raw = std::str::from_utf8(raw).map_err(|_| bad())?;
    if raw.contains('\0') {
        return Err(bad());
    }
    let lines: Vec<&str> = raw.split("\r\n").collect();
    let mut code = None;
    let mut enhanced = None;
    let mut texts = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let b = line.as_bytes();
        let sep = if last { b' ' } else { b'-' };
        if b.len() < 4
            || !matches!(b[0], b'4' | b'5')
            || !b[1].is_ascii_digit()
            || !b[2].is_ascii_digit()
            || b[3] != sep
            || line.contains(['\r', '\n'])
        {
            return Err(bad());
        }
        let this: u16 = line[..3].parse().map_err(|_| bad())?;
        if *code.get_or_insert(this) != this {
            return Err(bad());
        }
        let mut text = &line[4..];
        if let Some((status, rest)) = split_enhanced(text) {
            if status.as_bytes()[0] != b[0] {
                return Err(bad());
            }
            enhanced.get_or_insert_with(|| status.to_string());
            text = rest;
        }
        texts.push(unescape_percent(text));
    }
    Ok(SmtpReply {
        code: code.ok_or_else(bad)?,
        enhanced,
        text: texts.join("\n"),
    })
}

/// `x.y.z rest` → (`x.y.z`, `rest`), when the text starts with an RFC 3463
/// status (class digit, then 1–3 and 1–3 digits).
fn split_enhanced(text: &str) -> Option<(&str, &str)> {
    let end = text.find(' ').unwrap_or(text.len());
    let status = &text[..end];
    let mut parts = status.split('.');
    let digits =
        |s: &str, max: usize| (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let ok = matches!(parts.next(), Some(c) if digits(c, 1))
        && matches!(parts.next(), Some(s) if digits(s, 3))
        && matches!(parts.next(), Some(d) if digits(d, 3))
        && parts.next().is_none();
    ok.then(|| (status, text[end..].trim_start_matches(' ')))
}

fn unescape_percent(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            if let Some(next) = chars.next() {
                if next == '%' {
                    out.push('%');
                } else {
                    out.push(next);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(c: Command) -> Vec<u8> {
        let mut v = Vec::new();
        c.encode(&mut v).unwrap();
        v
    }

    #[test]
    fn optneg_is_version_actions_protocol() {
        assert_eq!(
            enc(Command::OptNeg {
                version: 6,
                actions: Actions::ALL,
                protocol: ProtocolFlags(0x1f_f7ff),
            }),
            b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x1f\xf7\xff"
        );
        assert_eq!(ProtocolFlags::OFFERED.0, 0x1f_f7ff);
    }

    #[test]
    fn macros_name_their_command_then_pairs() {
        let pairs = [
            ("j".to_string(), "mx.example.org".to_string()),
            ("{daemon_name}".to_string(), "letterbox".to_string()),
        ];
        assert_eq!(
            enc(Command::Macros {
                stage: MacroStage::Connect,
                pairs: &pairs
            }),
            b"\0\0\0\x2bDCj\0mx.example.org\0{daemon_name}\0letterbox\0"
        );
        assert_eq!(
            enc(Command::Macros {
                stage: MacroStage::EndOfHeaders,
                pairs: &[]
            }),
            b"\0\0\0\x02DN"
        );
        assert_eq!(
            enc(Command::Macros {
                stage: MacroStage::EndOfMessage,
                pairs: &[("i".into(), "Q1".into())]
            }),
            b"\0\0\0\x07DEi\0Q1\0"
        );
    }

    #[test]
    fn connect_carries_family_port_and_address() {
        let v4 = ClientAddress::Inet("192.0.2.7:40000".parse().unwrap());
        assert_eq!(
            enc(Command::Connect {
                hostname: "client.example",
                address: &v4
            }),
            b"\0\0\0\x1dCclient.example\0\x34\x9c\x40192.0.2.7\0"
        );
        let v6 = ClientAddress::Inet("[2001:db8::1]:25".parse().unwrap());
        assert_eq!(
            enc(Command::Connect {
                hostname: "[2001:db8::1]",
                address: &v6
            }),
            b"\0\0\0\x1eC[2001:db8::1]\0\x36\0\x192001:db8::1\0"
        );
        let unix = ClientAddress::Unix("/run/s".into());
        assert_eq!(
            enc(Command::Connect {
                hostname: "localhost",
                address: &unix
            }),
            b"\0\0\0\x15Clocalhost\0L\0\0/run/s\0"
        );
        assert_eq!(
            enc(Command::Connect {
                hostname: "unknown",
                address: &ClientAddress::Unknown
            }),
            b"\0\0\0\x0aCunknown\0U"
        );
    }

    #[test]
    fn envelope_commands_are_nul_terminated_strings() {
        assert_eq!(enc(Command::Helo("c.example")), b"\0\0\0\x0bHc.example\0");
        assert_eq!(
            enc(Command::Mail {
                sender: "<a@b.example>",
                args: &["SIZE=10".into(), "BODY=8BITMIME".into()]
            }),
            b"\0\0\0\x25M<a@b.example>\0SIZE=10\0BODY=8BITMIME\0"
        );
        assert_eq!(
            enc(Command::Rcpt {
                recipient: "<c@d.example>",
                args: &[]
            }),
            b"\0\0\0\x0fR<c@d.example>\0"
        );
        assert_eq!(
            enc(Command::Mail {
                sender: "<>",
                args: &[]
            }),
            b"\0\0\0\x04M<>\0"
        );
    }

    #[test]
    fn message_commands() {
        assert_eq!(enc(Command::Data), b"\0\0\0\x01T");
        assert_eq!(
            enc(Command::Header {
                name: "Subject",
                value: "hi\n\tthere"
            }),
            b"\0\0\0\x13LSubject\0hi\n\tthere\0"
        );
        assert_eq!(enc(Command::EndOfHeaders), b"\0\0\0\x01N");
        assert_eq!(enc(Command::Body(b"line\r\n")), b"\0\0\0\x07Bline\r\n");
        assert_eq!(enc(Command::EndOfMessage), b"\0\0\0\x01E");
        assert_eq!(enc(Command::Abort), b"\0\0\0\x01A");
        assert_eq!(enc(Command::Quit), b"\0\0\0\x01Q");
    }

    #[test]
    fn body_chunks_are_capped_and_nuls_refused() {
        let big = vec![b'x'; MAX_BODY_CHUNK];
        let v = enc(Command::Body(&big));
        assert_eq!(&v[..5], b"\0\x01\0\0B");
        assert_eq!(v.len(), 5 + MAX_BODY_CHUNK);
        let too_big = vec![b'x'; MAX_BODY_CHUNK + 1];
        let mut out = b"keep".to_vec();
        assert_eq!(
            Command::Body(&too_big).encode(&mut out),
            Err(EncodeError::ChunkTooLarge(MAX_BODY_CHUNK + 1))
        );
        assert_eq!(
            Command::Helo("a\0b").encode(&mut out),
            Err(EncodeError::Nul { what: "HELO name" })
        );
        assert_eq!(out, b"keep", "a failed encode leaves the buffer as it was");
        // A body chunk may hold NULs: it is length-delimited.
        assert_eq!(enc(Command::Body(b"\0")), b"\0\0\0\x02B\0");
    }

    fn dec(bytes: &[u8]) -> Result<Reply, DecodeError> {
        match decode_packet(bytes, MAX_REPLY_PACKET)? {
            Some((r, used)) => {
                assert_eq!(used, bytes.len(), "whole packet used");
                Ok(r)
            }
            None => panic!("incomplete"),
        }
    }

    #[test]
    fn decodes_the_verdicts() {
        assert_eq!(dec(b"\0\0\0\x01a"), Ok(Reply::Accept));
        assert_eq!(dec(b"\0\0\0\x01c"), Ok(Reply::Continue));
        assert_eq!(dec(b"\0\0\0\x01d"), Ok(Reply::Discard));
        assert_eq!(dec(b"\0\0\0\x01r"), Ok(Reply::Reject));
        assert_eq!(dec(b"\0\0\0\x01t"), Ok(Reply::TempFail));
        assert_eq!(dec(b"\0\0\0\x014"), Ok(Reply::Shutdown));
        assert_eq!(dec(b"\0\0\0\x01f"), Ok(Reply::ConnFail));
        assert_eq!(dec(b"\0\0\0\x01s"), Ok(Reply::Skip));
        assert_eq!(dec(b"\0\0\0\x01p"), Ok(Reply::Progress));
        assert_eq!(
            dec(b"\0\0\0\x02cx"),
            Err(DecodeError::Malformed {
                reply: 'c',
                why: "unexpected data"
            })
        );
    }

    #[test]
    fn decodes_reply_codes() {
        assert_eq!(
            dec(b"\0\0\0\x19y554 5.7.1 Gtube pattern\0"),
            Ok(Reply::ReplyCode(SmtpReply {
                code: 554,
                enhanced: Some("5.7.1".into()),
                text: "Gtube pattern".into()
            }))
        );
        assert_eq!(
            parse_smtp_reply(b"451 try 100%% later"),
            Ok(SmtpReply {
                code: 451,
                enhanced: None,
                text: "try 100% later".into()
            })
        );
        assert_eq!(
            parse_smtp_reply(b"550-5.7.1 first\r\n550 5.7.1 second"),
            Ok(SmtpReply {
                code: 550,
                enhanced: Some("5.7.1".into()),
                text: "first\nsecond".into()
            })
        );
        for bad in [
            &b"250 ok"[..],
            b"55 short",
            b"550",
            b"550-no final line",
            b"550 a\r\n550 b",
            b"550-a\r\n450 b",
            b"550 4.7.1 class mismatch",
            b"550 a\nb",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse_smtp_reply(bad), Err(DecodeError::BadReplyCode(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn decodes_header_edits() {
        assert_eq!(
            dec(b"\0\0\0\x0chX-Spam\0Yes\0"),
            Ok(Reply::AddHeader {
                name: "X-Spam".into(),
                value: "Yes".into()
            })
        );
        assert_eq!(
            dec(b"\0\0\0\x18i\0\0\0\0DKIM-Signature\0v=1\0"),
            Ok(Reply::InsertHeader {
                index: 0,
                name: "DKIM-Signature".into(),
                value: "v=1".into()
            })
        );
        assert_eq!(
            dec(b"\0\0\0\x0em\0\0\0\x02Subject\0\0"),
            Ok(Reply::ChangeHeader {
                index: 2,
                name: "Subject".into(),
                value: String::new()
            })
        );
        assert!(dec(b"\0\0\0\x07m\0\0\0\x01\0\0").is_err(), "empty name");
        assert!(dec(b"\0\0\0\x03hX\0").is_err(), "missing value");
        assert!(dec(b"\0\0\0\x06hX\0Y\0Z").is_err(), "trailing data");
    }

    #[test]
    fn decodes_envelope_and_body_edits() {
        assert_eq!(dec(b"\0\0\0\x05+a@b\0"), Ok(Reply::AddRcpt("a@b".into())));
        assert_eq!(dec(b"\0\0\0\x05-a@b\0"), Ok(Reply::DelRcpt("a@b".into())));
        assert_eq!(
            dec(b"\0\0\0\x102<a@b>\0NOTIFY=N\0"),
            Ok(Reply::AddRcptPar {
                rcpt: "<a@b>".into(),
                args: Some("NOTIFY=N".into())
            })
        );
        assert_eq!(
            dec(b"\0\0\0\x072<a@b>\0"),
            Ok(Reply::AddRcptPar {
                rcpt: "<a@b>".into(),
                args: None
            })
        );
        assert_eq!(
            dec(b"\0\0\0\x07e<x@y>\0"),
            Ok(Reply::ChangeFrom {
                sender: "<x@y>".into(),
                args: None
            })
        );
        assert_eq!(
            dec(b"\0\0\0\x05bnew\n"),
            Ok(Reply::ReplaceBody(b"new\n".to_vec()))
        );
        assert_eq!(
            dec(b"\0\0\0\x06qspam\0"),
            Ok(Reply::Quarantine("spam".into()))
        );
    }

    #[test]
    fn decodes_negotiation_with_macro_lists() {
        assert_eq!(
            dec(b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x0f\xf0\x80"),
            Ok(Reply::Negotiate(Negotiation {
                version: 6,
                actions: Actions(0x1ff),
                protocol: ProtocolFlags(0x0f_f080),
                macros: vec![]
            }))
        );
        let mut p = b"O\0\0\0\x06\0\0\0\x01\0\0\0\0".to_vec();
        p.extend_from_slice(b"\0\0\0\x02{auth_authen} i\0");
        p.extend_from_slice(b"\0\0\0\x09ignored\0");
        p.extend_from_slice(b"\0\0\0\x05i\0");
        let mut framed = (p.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&p);
        assert_eq!(
            dec(&framed),
            Ok(Reply::Negotiate(Negotiation {
                version: 6,
                actions: Actions(1),
                protocol: ProtocolFlags(0),
                macros: vec![
                    (MacroStage::Mail, "{auth_authen} i".into()),
                    (MacroStage::EndOfMessage, "i".into())
                ]
            }))
        );
        assert!(dec(b"\0\0\0\x09O\0\0\0\x06\0\0\0\0").is_err(), "short");
        assert!(dec(b"\0\0\0\x10O\0\0\0\x06\0\0\0\0\0\0\0\0\0\0\0").is_err());
        assert_eq!(
            dec(b"\0\0\0\x07l\0\0\0\x03i\0"),
            Ok(Reply::SetSymList {
                stage: MacroStage::Rcpt,
                macros: "i".into()
            })
        );
    }

    #[test]
    fn framing_waits_for_whole_packets_and_caps_lengths() {
        let two = b"\0\0\0\x01c\0\0\0\x01a";
        assert_eq!(decode_packet(&two[..3], 10), Ok(None));
        assert_eq!(decode_packet(&two[..4], 10), Ok(None));
        assert_eq!(decode_packet(two, 10), Ok(Some((Reply::Continue, 5))));
        assert_eq!(decode_packet(&two[5..], 10), Ok(Some((Reply::Accept, 5))));
        assert_eq!(decode_packet(b"\0\0\0\0", 10), Err(DecodeError::Empty));
        assert_eq!(
            decode_packet(b"\xff\xff\xff\xffc", 10),
            Err(DecodeError::TooLarge {
                len: 0xffff_ffff,
                max: 10
            })
        );
        assert_eq!(
            decode_packet(b"\0\0\0\x01Z", 10),
            Err(DecodeError::UnknownReply('Z'))
        );
    }

    #[test]
    fn hostile_input_never_panics() {
        // Every prefix of every valid packet, and a deterministic spray of
        // random bytes behind each reply code.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for code in 0..=255u8 {
            for len in 0..40 {
                let data: Vec<u8> = (0..len)
                    .map(|_| match next() % 4 {
                        0 => 0,
                        1 => b'5',
                        _ => next() as u8,
                    })
                    .collect();
                let _ = decode(code, &data);
                let mut framed = ((data.len() + 1) as u32).to_be_bytes().to_vec();
                framed.push(code);
                framed.extend_from_slice(&data);
                for cut in 0..framed.len() {
                    let _ = decode_packet(&framed[..cut], 64);
                }
            }
        }
    }

    #[test]
    fn enhanced_status_is_split_only_when_well_formed() {
        assert_eq!(split_enhanced("5.7.1 no"), Some(("5.7.1", "no")));
        assert_eq!(split_enhanced("4.2.100 x"), Some(("4.2.100", "x")));
        assert_eq!(split_enhanced("4.2.1000 x"), None);
        assert_eq!(split_enhanced("5.7 no"), None);
        assert_eq!(split_enhanced("55.7.1 no"), None);
        assert_eq!(split_enhanced("5.7.1"), Some(("5.7.1", "")));
        assert_eq!(split_enhanced("Spam"), None);
    }
}
