//! One milter connection for one SMTP session: negotiation, the stages in
//! order, the macros each stage carries, and a timeout on every exchange.
//!
//! The negotiation decides what is sent at all. A milter may skip stages
//! (`SMFIP_NO*`: the event is not sent, its macros still are, as Postfix
//! does), may promise not to answer some (`SMFIP_NR_*`: the event is sent
//! and nothing is read back), may replace the macro lists per stage, and
//! names the modifications it may ask for (`SMFIF_*`; anything else is a
//! protocol error). After the milter accepts a message, the rest of that
//! message is not sent; after it accepts or rejects the connection,
//! nothing more is.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::{Instant, timeout_at};

use super::codec::{
    self, Actions, ClientAddress, Command, MAX_BODY_CHUNK, MacroStage, Negotiation, ProtocolFlags,
    Reply, cmd,
};
use super::{
    ConnectInfo, EndOfMessage, HeloInfo, MailInfo, MilterError, Modification, RcptInfo, Response,
};
use crate::endpoint::Endpoint;

/// A byte stream a milter speaks over: TCP, a UNIX socket, or (in tests)
/// an in-memory pipe.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Limits for one milter connection.
#[derive(Debug, Clone)]
pub struct MilterOptions {
    /// How long connecting and negotiating may take, and each exchange
    /// after it: one event sent and its answer read. A progress packet
    /// (`p`) from the milter starts the wait again. Postfix's
    /// `milter_command_timeout` is 30 s.
    pub timeout: Duration,
    /// The largest reply packet accepted; a bigger length is a protocol
    /// error before any of it is read, so memory stays bounded.
    pub max_reply_packet: usize,
    /// The most bytes of modifications (header text, recipients, body
    /// replacement) accepted at the end of one message.
    pub max_modifications: usize,
}

impl Default for MilterOptions {
    fn default() -> Self {
        MilterOptions {
            timeout: Duration::from_secs(30),
            max_reply_packet: codec::MAX_REPLY_PACKET,
            max_modifications: 64 << 20,
        }
    }
}

/// The macro names sent at each stage unless the milter asks for others.
/// Postfix's defaults, with the client's address and names added at
/// connect because rspamd and OpenDKIM read them there.
const DEFAULT_MACROS: [&[&str]; 7] = [
    // Connect
    &[
        "j",
        "{daemon_name}",
        "{daemon_addr}",
        "{daemon_port}",
        "v",
        "_",
        "{client_addr}",
        "{client_port}",
        "{client_name}",
        "{client_ptr}",
    ],
    // Helo
    &[
        "{tls_version}",
        "{cipher}",
        "{cipher_bits}",
        "{cert_subject}",
        "{cert_issuer}",
    ],
    // Mail
    &[
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
    ],
    // Rcpt
    &["i", "{rcpt_addr}", "{rcpt_host}"],
    // Data
    &["i"],
    // EndOfMessage
    &["i"],
    // EndOfHeaders
    &["i"],
];

/// Macros that belong to one transaction, forgotten at the next MAIL.
const MESSAGE_MACROS: &[&str] = &[
    "i",
    "{auth_type}",
    "{auth_authen}",
    "{auth_author}",
    "{mail_addr}",
    "{mail_host}",
    "{rcpt_addr}",
    "{rcpt_host}",
];

/// Where the conversation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Negotiated; the connect stage comes next.
    Ready,
    /// Connected, between messages.
    Session,
    /// MAIL was sent; a message is in progress.
    Message,
    /// The milter accepted or discarded this message: nothing more of it
    /// is sent.
    AcceptMessage,
    /// The milter accepted the connection: nothing more is sent at all.
    AcceptConnection,
    /// The milter refused the connection: every stage gets this answer.
    RejectConnection(Response),
    /// An error left the stream in an unknown place.
    Broken,
}

/// One event to send: what it is, and how negotiation treats it.
struct Event<'a> {
    command: Command<'a>,
    /// The macros sent with it, if any.
    stage: Option<MacroStage>,
    /// The `SMFIP_NO*` flag that skips it.
    skip: u32,
    /// The `SMFIP_NR_*` flag that says no reply comes.
    no_reply: u32,
    /// The oldest protocol version that knows the event.
    min_version: u32,
    /// For errors and logs.
    during: &'static str,
}

/// A connection to one milter, for one SMTP session.
pub struct Milter {
    /// The stream, buffered for reading; writes go out one event at a
    /// time from `out`.
    io: BufReader<Box<dyn Io>>,
    /// Limits and timeouts.
    options: MilterOptions,
    /// What the milter agreed to, its protocol flags reduced to those
    /// letterbox offered and its version knows.
    negotiation: Negotiation,
    /// Macro names to send per stage, by [`MacroStage`] number.
    macro_lists: [Vec<String>; 7],
    /// Every macro value known so far in this session. Names are looked
    /// up here whichever stage asks for them, so a milter may ask for
    /// `{client_addr}` at MAIL.
    macros: BTreeMap<&'static str, String>,
    /// Where the conversation stands.
    state: State,
    /// After `s`: the event kind to stop sending until another kind is.
    skip: Option<u8>,
    /// Reused buffer for outgoing packets.
    out: Vec<u8>,
}

impl fmt::Debug for Milter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Milter")
            .field("negotiation", &self.negotiation)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Milter {
    /// Connects to the milter at `address` (`inet:HOST:PORT`,
    /// `unix:/path`) and negotiates, all within `timeout`, which then
    /// bounds every later exchange too.
    pub async fn connect(address: &str, timeout: Duration) -> Result<Milter, MilterError> {
        let endpoint = Endpoint::parse(address)?;
        let options = MilterOptions {
            timeout,
            ..MilterOptions::default()
        };
        Milter::connect_with(&endpoint, options).await
    }

    /// [`Milter::connect`] with all the limits given.
    pub async fn connect_with(
        endpoint: &Endpoint,
        options: MilterOptions,
    ) -> Result<Milter, MilterError> {
        let deadline = Instant::now() + options.timeout;
        let stream = match timeout_at(deadline, endpoint.connect()).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(MilterError::Connect {
                    endpoint: endpoint.to_string(),
                    source,
                });
            }
            Err(_) => {
                return Err(MilterError::Timeout {
                    during: "connect",
                    after: options.timeout,
                });
            }
        };
        Milter::negotiate(Box::new(stream), options, deadline).await
    }

    /// Negotiates over a stream that is already connected.
    pub async fn over(stream: Box<dyn Io>, options: MilterOptions) -> Result<Milter, MilterError> {
        let deadline = Instant::now() + options.timeout;
        Milter::negotiate(stream, options, deadline).await
    }

    async fn negotiate(
        stream: Box<dyn Io>,
        options: MilterOptions,
        deadline: Instant,
    ) -> Result<Milter, MilterError> {
        let mut m = Milter {
            io: BufReader::new(stream),
            options,
            negotiation: Negotiation {
                version: 0,
                actions: Actions(0),
                protocol: ProtocolFlags(0),
                macros: Vec::new(),
            },
            macro_lists: DEFAULT_MACROS.map(|l| l.iter().map(|s| s.to_string()).collect()),
            macros: BTreeMap::new(),
            state: State::Broken,
            skip: None,
            out: Vec::with_capacity(256),
        };
        let during = "negotiation";
        m.out.clear();
        Command::OptNeg {
            version: codec::VERSION,
            actions: Actions::ALL,
            protocol: ProtocolFlags::OFFERED,
        }
        .encode(&mut m.out)
        .map_err(|source| MilterError::Encode { during, source })?;
        m.write_out(deadline, during).await?;
        let n = match m.read_reply(deadline, during).await? {
            Reply::Negotiate(n) => n,
            other => {
                return Err(MilterError::Protocol {
                    during,
                    why: format!("expected the negotiation reply, got {other:?}"),
                });
            }
        };
        if !(2..=codec::VERSION).contains(&n.version) {
            return Err(MilterError::Protocol {
                during,
                why: format!("unsupported protocol version {}", n.version),
            });
        }
        if n.actions.0 & !Actions::ALL.0 != 0 {
            return Err(MilterError::Protocol {
                during,
                why: format!("asks for unknown actions {:#x}", n.actions.0),
            });
        }
        let mut protocol = n.protocol.0 & ProtocolFlags::OFFERED.0;
        if n.version < 6 {
            // Older milters know no no-reply flags or skip; keep only the
            // plain skip flags of their version.
            protocol &= 0x7f | ProtocolFlags::NO_UNKNOWN | ProtocolFlags::NO_DATA;
        }
        for (stage, list) in &n.macros {
            m.macro_lists[*stage as usize] = list.split_whitespace().map(str::to_string).collect();
        }
        m.negotiation = Negotiation {
            protocol: ProtocolFlags(protocol),
            ..n
        };
        m.state = State::Ready;
        Ok(m)
    }

    /// What the milter agreed to.
    pub fn negotiation(&self) -> &Negotiation {
        &self.negotiation
    }

    /// The connect stage: the client's address and names. Must come first,
    /// once.
    pub async fn connect_info(&mut self, info: &ConnectInfo) -> Result<Response, MilterError> {
        match &self.state {
            State::Ready => {}
            State::Broken => return Err(MilterError::Unusable),
            _ => return Err(MilterError::OutOfOrder { stage: "connect" }),
        }
        self.macros.clear();
        let m = &mut self.macros;
        m.insert("j", info.hostname.clone());
        m.insert("{daemon_name}", info.daemon_name.clone());
        m.insert("v", format!("letterbox {}", env!("CARGO_PKG_VERSION")));
        if let Some(local) = info.local {
            m.insert("{daemon_addr}", local.ip().to_string());
            m.insert("{daemon_port}", local.port().to_string());
        }
        if let Some(client) = info.client {
            m.insert("{client_addr}", client.ip().to_string());
            m.insert("{client_port}", client.port().to_string());
            let ptr = info.client_ptr.as_deref().unwrap_or("unknown");
            m.insert("_", format!("{ptr} [{}]", client.ip()));
        }
        m.insert(
            "{client_name}",
            info.client_name.clone().unwrap_or_else(|| "unknown".into()),
        );
        if let Some(ptr) = &info.client_ptr {
            m.insert("{client_ptr}", ptr.clone());
        }
        let hostname = match (&info.client_name, info.client) {
            (Some(name), _) => name.clone(),
            (None, Some(client)) => format!("[{}]", client.ip()),
            (None, None) => "unknown".to_string(),
        };
        let address = match info.client {
            Some(sa) => ClientAddress::Inet(sa),
            None => ClientAddress::Unknown,
        };
        self.state = State::Session;
        let r = self
            .event(Event {
                command: Command::Connect {
                    hostname: &hostname,
                    address: &address,
                },
                stage: Some(MacroStage::Connect),
                skip: ProtocolFlags::NO_CONNECT,
                no_reply: ProtocolFlags::NR_CONNECT,
                min_version: 2,
                during: "connect",
            })
            .await?;
        Ok(self.after_connection_stage(r))
    }

    /// The HELO/EHLO stage; again after STARTTLS, with the TLS session.
    pub async fn helo(&mut self, info: &HeloInfo) -> Result<Response, MilterError> {
        if let Some(r) = self.connection_verdict("helo")? {
            return Ok(r);
        }
        if matches!(self.state, State::Message | State::AcceptMessage) {
            // A new HELO ends the transaction, as RSET would.
            self.abort().await?;
        }
        self.macros.insert("s", info.name.clone());
        for name in [
            "{tls_version}",
            "{cipher}",
            "{cipher_bits}",
            "{cert_subject}",
            "{cert_issuer}",
        ] {
            self.macros.remove(name);
        }
        if let Some(tls) = &info.tls {
            self.macros.insert("{tls_version}", tls.version.clone());
            self.macros.insert("{cipher}", tls.cipher.clone());
            if let Some(bits) = tls.cipher_bits {
                self.macros.insert("{cipher_bits}", bits.to_string());
            }
            if let Some(s) = &tls.cert_subject {
                self.macros.insert("{cert_subject}", s.clone());
            }
            if let Some(s) = &tls.cert_issuer {
                self.macros.insert("{cert_issuer}", s.clone());
            }
        }
        let r = self
            .event(Event {
                command: Command::Helo(&info.name),
                stage: Some(MacroStage::Helo),
                skip: ProtocolFlags::NO_HELO,
                no_reply: ProtocolFlags::NR_HELO,
                min_version: 2,
                during: "helo",
            })
            .await?;
        Ok(self.after_connection_stage(r))
    }

    /// The MAIL FROM stage: starts a message. A message still in progress
    /// is aborted first.
    pub async fn mail(&mut self, info: &MailInfo) -> Result<Response, MilterError> {
        if let Some(r) = self.connection_verdict("mail")? {
            return Ok(r);
        }
        if matches!(self.state, State::Message | State::AcceptMessage) {
            self.abort().await?;
        }
        for name in MESSAGE_MACROS {
            self.macros.remove(name);
        }
        let m = &mut self.macros;
        m.insert("i", info.queue_id.clone());
        m.insert("{mail_addr}", info.sender.clone());
        if let Some((_, domain)) = info.sender.rsplit_once('@') {
            m.insert("{mail_host}", domain.to_string());
        }
        if let Some(auth) = &info.auth {
            m.insert("{auth_type}", auth.mechanism.clone());
            m.insert("{auth_authen}", auth.username.clone());
            if let Some(author) = &auth.author {
                m.insert("{auth_author}", author.clone());
            }
        }
        let sender = format!("<{}>", info.sender);
        self.state = State::Message;
        let r = self
            .event(Event {
                command: Command::Mail {
                    sender: &sender,
                    args: &info.args,
                },
                stage: Some(MacroStage::Mail),
                skip: ProtocolFlags::NO_MAIL,
                no_reply: ProtocolFlags::NR_MAIL,
                min_version: 2,
                during: "mail",
            })
            .await?;
        Ok(self.after_message_stage(r, true))
    }

    /// The RCPT TO stage, for one recipient the MTA accepted. A rejection
    /// concerns this recipient only.
    pub async fn rcpt(&mut self, info: &RcptInfo) -> Result<Response, MilterError> {
        if let Some(r) = self.message_verdict("rcpt")? {
            return Ok(r);
        }
        self.macros.insert("{rcpt_addr}", info.recipient.clone());
        match info.recipient.rsplit_once('@') {
            Some((_, domain)) => self.macros.insert("{rcpt_host}", domain.to_string()),
            None => self.macros.remove("{rcpt_host}"),
        };
        let recipient = format!("<{}>", info.recipient);
        let r = self
            .event(Event {
                command: Command::Rcpt {
                    recipient: &recipient,
                    args: &info.args,
                },
                stage: Some(MacroStage::Rcpt),
                skip: ProtocolFlags::NO_RCPT,
                no_reply: ProtocolFlags::NR_RCPT,
                min_version: 2,
                during: "rcpt",
            })
            .await?;
        Ok(self.after_message_stage(r, false))
    }

    /// The DATA command (not sent to milters older than version 4).
    pub async fn data(&mut self) -> Result<Response, MilterError> {
        self.message_event(Event {
            command: Command::Data,
            stage: Some(MacroStage::Data),
            skip: ProtocolFlags::NO_DATA,
            no_reply: ProtocolFlags::NR_DATA,
            min_version: 4,
            during: "data",
        })
        .await
    }

    /// One header field: its name, and its value as it follows the colon
    /// (leading space and folding included; CRLF or LF line breaks). The
    /// milter sees the value the way Sendmail shows it: one leading space
    /// removed unless it asked for leading spaces, lines joined by LF.
    pub async fn header(&mut self, name: &str, value: &str) -> Result<Response, MilterError> {
        let mut v = value;
        if !self
            .negotiation
            .protocol
            .has(ProtocolFlags::HEADER_LEADING_SPACE)
        {
            v = v.strip_prefix(' ').unwrap_or(v);
        }
        let v = v.replace("\r\n", "\n");
        self.message_event(Event {
            command: Command::Header { name, value: &v },
            stage: None,
            skip: ProtocolFlags::NO_HEADERS,
            no_reply: ProtocolFlags::NR_HEADER,
            min_version: 2,
            during: "header",
        })
        .await
    }

    /// The end of the header section.
    pub async fn end_of_headers(&mut self) -> Result<Response, MilterError> {
        self.message_event(Event {
            command: Command::EndOfHeaders,
            stage: Some(MacroStage::EndOfHeaders),
            skip: ProtocolFlags::NO_EOH,
            no_reply: ProtocolFlags::NR_EOH,
            min_version: 2,
            during: "end of headers",
        })
        .await
    }

    /// Body bytes (CRLF line ends, dot-unstuffed), in as many calls as the
    /// caller likes; each is sent in chunks of at most 64 KiB. After the
    /// milter says skip, the rest of the body is not sent.
    pub async fn body(&mut self, data: &[u8]) -> Result<Response, MilterError> {
        for chunk in data.chunks(MAX_BODY_CHUNK) {
            let r = self
                .message_event(Event {
                    command: Command::Body(chunk),
                    stage: None,
                    skip: ProtocolFlags::NO_BODY,
                    no_reply: ProtocolFlags::NR_BODY,
                    min_version: 2,
                    during: "body",
                })
                .await?;
            if r != Response::Continue || self.skip == Some(cmd::BODY) {
                return Ok(r);
            }
        }
        Ok(Response::Continue)
    }

    /// The end of the message: the milter's verdict and the edits it asks
    /// for. The message is over afterwards; the next one starts at MAIL.
    pub async fn end_of_message(&mut self) -> Result<EndOfMessage, MilterError> {
        if let Some(response) = self.message_verdict("end of message")? {
            if self.state == State::AcceptMessage {
                self.state = State::Session;
            }
            return Ok(EndOfMessage {
                response,
                modifications: Vec::new(),
            });
        }
        let mut modifications = Vec::new();
        let response = self
            .exchange(
                Event {
                    command: Command::EndOfMessage,
                    stage: Some(MacroStage::EndOfMessage),
                    skip: 0,
                    no_reply: 0,
                    min_version: 2,
                    during: "end of message",
                },
                Some(&mut modifications),
            )
            .await?;
        if self.state != State::Broken {
            self.state = match response {
                Response::Shutdown => State::RejectConnection(response.clone()),
                _ => State::Session,
            };
        }
        if !matches!(
            response,
            Response::Continue | Response::Accept | Response::Quarantine(_)
        ) {
            modifications.clear();
        }
        Ok(EndOfMessage {
            response,
            modifications,
        })
    }

    /// Sends a whole message as received after DATA (header section, blank
    /// line, body; CRLF line ends): every header field, the end of the
    /// headers, the body and the end of the message. Stops at the first
    /// stage that does not let the message through, and returns its
    /// response with no modifications.
    pub async fn message(&mut self, raw: &[u8]) -> Result<EndOfMessage, MilterError> {
        let (fields, body) = split_message(raw);
        let mut quarantine = None;
        let mut check = |r: Response| match r {
            Response::Continue => None,
            Response::Quarantine(reason) => {
                quarantine = Some(reason);
                None
            }
            other => Some(other),
        };
        let stop = |response| {
            Ok(EndOfMessage {
                response,
                modifications: Vec::new(),
            })
        };
        for (name, value) in fields {
            if let Some(r) = check(self.header(&name, &value).await?) {
                return stop(r);
            }
        }
        if let Some(r) = check(self.end_of_headers().await?) {
            return stop(r);
        }
        if let Some(r) = check(self.body(body).await?) {
            return stop(r);
        }
        let mut eom = self.end_of_message().await?;
        if let (Some(reason), Response::Continue | Response::Accept) = (quarantine, &eom.response) {
            eom.response = Response::Quarantine(reason);
        }
        Ok(eom)
    }

    /// Forgets the message in progress (RSET, a rejected transaction, a
    /// client gone mid-message). Nothing is sent when no message is.
    pub async fn abort(&mut self) -> Result<(), MilterError> {
        match self.state {
            State::Broken => Err(MilterError::Unusable),
            State::Message | State::AcceptMessage => {
                let during = "abort";
                self.skip = None;
                self.out.clear();
                Command::Abort
                    .encode(&mut self.out)
                    .map_err(|source| MilterError::Encode { during, source })?;
                let deadline = Instant::now() + self.options.timeout;
                let r = self.write_out(deadline, during).await;
                self.state = if r.is_ok() {
                    State::Session
                } else {
                    State::Broken
                };
                r
            }
            _ => Ok(()),
        }
    }

    /// Says goodbye and closes the connection.
    pub async fn quit(mut self) -> Result<(), MilterError> {
        if self.state == State::Broken {
            return Err(MilterError::Unusable);
        }
        let during = "quit";
        self.out.clear();
        Command::Quit
            .encode(&mut self.out)
            .map_err(|source| MilterError::Encode { during, source })?;
        let deadline = Instant::now() + self.options.timeout;
        self.write_out(deadline, during).await?;
        match timeout_at(deadline, self.io.get_mut().shutdown()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(MilterError::Io { during, source }),
            Err(_) => Err(MilterError::Timeout {
                during,
                after: self.options.timeout,
            }),
        }
    }

    // ---- state ----

    /// `Some(response)` when the connection-level state answers for the
    /// milter; an error when no stage may run now.
    fn connection_verdict(&self, stage: &'static str) -> Result<Option<Response>, MilterError> {
        match &self.state {
            State::Broken => Err(MilterError::Unusable),
            State::Ready => Err(MilterError::OutOfOrder { stage }),
            State::AcceptConnection => Ok(Some(Response::Continue)),
            State::RejectConnection(r) => Ok(Some(r.clone())),
            State::Session | State::Message | State::AcceptMessage => Ok(None),
        }
    }

    /// [`Milter::connection_verdict`] for the stages inside a message.
    fn message_verdict(&self, stage: &'static str) -> Result<Option<Response>, MilterError> {
        if let Some(r) = self.connection_verdict(stage)? {
            return Ok(Some(r));
        }
        match self.state {
            State::Session => Err(MilterError::OutOfOrder { stage }),
            State::AcceptMessage => Ok(Some(Response::Continue)),
            _ => Ok(None),
        }
    }

    async fn message_event(&mut self, event: Event<'_>) -> Result<Response, MilterError> {
        if let Some(r) = self.message_verdict(event.during)? {
            return Ok(r);
        }
        let r = self.event(event).await?;
        Ok(self.after_message_stage(r, true))
    }

    /// Connect and HELO: an accept or refusal covers the connection.
    fn after_connection_stage(&mut self, r: Response) -> Response {
        match r {
            Response::Accept => self.state = State::AcceptConnection,
            Response::Reject | Response::TempFail | Response::ReplyCode(_) | Response::Shutdown => {
                self.state = State::RejectConnection(r.clone())
            }
            // A discard is meaningless before a message (Postfix ignores
            // it too).
            Response::Discard => return Response::Continue,
            Response::Continue | Response::Quarantine(_) => {}
        }
        r
    }

    /// MAIL, RCPT and the content stages. `ends_message`: whether a
    /// refusal here ends the transaction (all but RCPT, where it refuses
    /// one recipient).
    fn after_message_stage(&mut self, r: Response, ends_message: bool) -> Response {
        match &r {
            Response::Accept | Response::Discard => self.state = State::AcceptMessage,
            Response::Shutdown => self.state = State::RejectConnection(r.clone()),
            Response::Reject | Response::TempFail | Response::ReplyCode(_) if ends_message => {
                // The milter has dropped the message already (libmilter
                // goes back to its HELO state); an abort would be ignored.
                self.state = State::Session
            }
            _ => {}
        }
        r
    }

    // ---- the exchange ----

    /// Sends one event (with its macros) and reads its answer, marking the
    /// connection unusable on any error.
    async fn event(&mut self, event: Event<'_>) -> Result<Response, MilterError> {
        self.exchange(event, None).await
    }

    async fn exchange(
        &mut self,
        event: Event<'_>,
        modifications: Option<&mut Vec<Modification>>,
    ) -> Result<Response, MilterError> {
        let r = self.exchange_inner(event, modifications).await;
        if r.is_err() {
            self.state = State::Broken;
        }
        r
    }

    async fn exchange_inner(
        &mut self,
        event: Event<'_>,
        modifications: Option<&mut Vec<Modification>>,
    ) -> Result<Response, MilterError> {
        let during = event.during;
        let code = event.command.code();
        if self.negotiation.version < event.min_version {
            return Ok(Response::Continue);
        }
        if self.skip.is_some() {
            if self.skip == Some(code) {
                return Ok(Response::Continue);
            }
            self.skip = None;
        }
        self.out.clear();
        if let Some(stage) = event.stage {
            let pairs: Vec<(String, String)> = self.macro_lists[stage as usize]
                .iter()
                .filter_map(|name| lookup(&self.macros, name).map(|v| (name.clone(), v.clone())))
                .collect();
            if !pairs.is_empty() {
                Command::Macros {
                    stage,
                    pairs: &pairs,
                }
                .encode(&mut self.out)
                .map_err(|source| MilterError::Encode { during, source })?;
            }
        }
        let protocol = self.negotiation.protocol;
        let skipped = event.skip != 0 && protocol.has(event.skip);
        if !skipped {
            event
                .command
                .encode(&mut self.out)
                .map_err(|source| MilterError::Encode { during, source })?;
        }
        let mut deadline = Instant::now() + self.options.timeout;
        if !self.out.is_empty() {
            self.write_out(deadline, during).await?;
        }
        if skipped || (event.no_reply != 0 && protocol.has(event.no_reply)) {
            return Ok(Response::Continue);
        }
        let mut edits = Edits {
            list: modifications,
            bytes: 0,
            max: self.options.max_modifications,
            actions: self.negotiation.actions,
            leading_space: protocol.has(ProtocolFlags::HEADER_LEADING_SPACE),
        };
        let mut quarantine = None;
        loop {
            let reply = self.read_reply(deadline, during).await?;
            let verdict = match reply {
                Reply::Progress => {
                    deadline = Instant::now() + self.options.timeout;
                    continue;
                }
                Reply::Quarantine(reason) => {
                    quarantine = Some(reason);
                    continue;
                }
                Reply::Continue => Response::Continue,
                Reply::Accept => Response::Accept,
                Reply::Discard => Response::Discard,
                Reply::Reject => Response::Reject,
                Reply::TempFail => Response::TempFail,
                Reply::ReplyCode(r) => Response::ReplyCode(r),
                Reply::Shutdown | Reply::ConnFail => Response::Shutdown,
                Reply::Skip => {
                    self.skip = Some(code);
                    Response::Continue
                }
                Reply::Negotiate(_) | Reply::SetSymList { .. } => {
                    return Err(MilterError::Protocol {
                        during,
                        why: "negotiation packet after negotiation".into(),
                    });
                }
                edit => {
                    edits
                        .push(edit)
                        .map_err(|why| MilterError::Protocol { during, why })?;
                    continue;
                }
            };
            return Ok(match (verdict, quarantine) {
                (v @ (Response::Continue | Response::Accept), Some(reason)) => {
                    if v == Response::Accept {
                        // The answer becomes Quarantine, but the milter
                        // still accepted: send it nothing more.
                        self.state = if matches!(code, cmd::CONNECT | cmd::HELO) {
                            State::AcceptConnection
                        } else {
                            State::AcceptMessage
                        };
                    }
                    Response::Quarantine(reason)
                }
                (v, _) => v,
            });
        }
    }

    async fn write_out(
        &mut self,
        deadline: Instant,
        during: &'static str,
    ) -> Result<(), MilterError> {
        let io = self.io.get_mut();
        match timeout_at(deadline, async {
            io.write_all(&self.out).await?;
            io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(io_error(during, source)),
            Err(_) => Err(MilterError::Timeout {
                during,
                after: self.options.timeout,
            }),
        }
    }

    async fn read_reply(
        &mut self,
        deadline: Instant,
        during: &'static str,
    ) -> Result<Reply, MilterError> {
        let max = self.options.max_reply_packet;
        let io = &mut self.io;
        let read = async {
            let mut header = [0u8; 4];
            io.read_exact(&mut header).await?;
            let len = match codec::packet_len(header, max) {
                Ok(len) => len,
                Err(e) => return Ok(Err(e)),
            };
            let mut packet = vec![0u8; len];
            io.read_exact(&mut packet).await?;
            Ok(codec::decode(packet[0], &packet[1..]))
        };
        match timeout_at(deadline, read).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(source))) => Err(MilterError::Decode { during, source }),
            Ok(Err(source)) => Err(io_error(during, source)),
            Err(_) => Err(MilterError::Timeout {
                during,
                after: self.options.timeout,
            }),
        }
    }
}

fn io_error(during: &'static str, source: std::io::Error) -> MilterError {
    if source.kind() == std::io::ErrorKind::UnexpectedEof {
        MilterError::Closed { during }
    } else {
        MilterError::Io { during, source }
    }
}

/// A macro's value by the name a milter wrote: `{name}` or, for long
/// names, `name` without braces as some milters write them.
fn lookup<'a>(macros: &'a BTreeMap<&'static str, String>, name: &str) -> Option<&'a String> {
    macros.get(name).or_else(|| {
        if name.len() > 1 && !name.starts_with('{') {
            macros.get(format!("{{{name}}}").as_str())
        } else {
            None
        }
    })
}

/// The modifications collected at the end of a message, checked against
/// what was negotiated and bounded in size.
struct Edits<'a> {
    /// Where they go; `None` outside the end of a message, where any edit
    /// is a protocol error.
    list: Option<&'a mut Vec<Modification>>,
    /// Bytes so far.
    bytes: usize,
    /// The cap on `bytes`.
    max: usize,
    /// What the milter may ask for.
    actions: Actions,
    /// Whether header values come with their leading space.
    leading_space: bool,
}

impl Edits<'_> {
    fn push(&mut self, reply: Reply) -> Result<(), String> {
        let Some(list) = self.list.as_deref_mut() else {
            return Err(format!(
                "modification {reply:?} before the end of the message"
            ));
        };
        let (needed, size) = match &reply {
            Reply::AddHeader { name, value } => (Actions::ADD_HEADERS, name.len() + value.len()),
            Reply::InsertHeader { name, value, .. } | Reply::ChangeHeader { name, value, .. } => {
                (Actions::CHANGE_HEADERS, name.len() + value.len())
            }
            Reply::ReplaceBody(b) => (Actions::CHANGE_BODY, b.len()),
            Reply::AddRcpt(r) => (Actions::ADD_RCPT, r.len()),
            Reply::AddRcptPar { rcpt, args } => (
                Actions::ADD_RCPT_PAR,
                rcpt.len() + args.as_ref().map_or(0, String::len),
            ),
            Reply::DelRcpt(r) => (Actions::DEL_RCPT, r.len()),
            Reply::ChangeFrom { sender, args } => (
                Actions::CHANGE_FROM,
                sender.len() + args.as_ref().map_or(0, String::len),
            ),
            other => return Err(format!("unexpected reply {other:?}")),
        };
        if !self.actions.has(needed) {
            return Err(format!("{reply:?} was not negotiated"));
        }
        // Count a little per entry too, so many empty edits stay bounded.
        self.bytes = self.bytes.saturating_add(size + 32);
        if self.bytes > self.max {
            return Err(format!("modifications exceed {} bytes", self.max));
        }
        let leading_space = self.leading_space;
        let value = |v: String| header_value(&v, leading_space);
        let m = match reply {
            Reply::AddHeader { name, value: v } => Modification::AddHeader {
                name,
                value: value(v),
            },
            Reply::InsertHeader {
                index,
                name,
                value: v,
            } => Modification::InsertHeader {
                index,
                name,
                value: value(v),
            },
            Reply::ChangeHeader {
                index,
                name,
                value: v,
            } => Modification::ChangeHeader {
                // Sendmail treats index 0 as 1; so does Postfix.
                index: index.max(1),
                name,
                value: (!v.is_empty()).then(|| value(v)),
            },
            Reply::ReplaceBody(chunk) => {
                if let Some(Modification::ReplaceBody(body)) = list.last_mut() {
                    body.extend_from_slice(&chunk);
                    return Ok(());
                }
                if list
                    .iter()
                    .any(|m| matches!(m, Modification::ReplaceBody(_)))
                {
                    return Err("body replacement interrupted by other edits".into());
                }
                Modification::ReplaceBody(chunk)
            }
            Reply::AddRcpt(recipient) => Modification::AddRecipient {
                recipient,
                args: None,
            },
            Reply::AddRcptPar { rcpt, args } => Modification::AddRecipient {
                recipient: rcpt,
                args,
            },
            Reply::DelRcpt(r) => Modification::DeleteRecipient(r),
            Reply::ChangeFrom { sender, args } => Modification::ChangeSender { sender, args },
            _ => unreachable!("filtered above"),
        };
        list.push(m);
        Ok(())
    }
}

/// A header value from a milter as the text after the colon: a space in
/// front unless the milter sends its own, and CRLF between folded lines
/// (milters fold with a bare LF, as Sendmail stores headers).
fn header_value(v: &str, leading_space: bool) -> String {
    let mut out = String::with_capacity(v.len() + 8);
    if !leading_space {
        out.push(' ');
    }
    let mut prev = '\0';
    for c in v.chars() {
        if c == '\n' && prev != '\r' {
            out.push('\r');
        }
        out.push(c);
        prev = c;
    }
    out
}

/// Splits a message into header fields (name, text after the colon with
/// its CRLFs) and the body. The header section ends at the first empty
/// line, or at the first line that is no header field (which then starts
/// the body, as Postfix does).
fn split_message(raw: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        let end = raw[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| pos + i + 1);
        let line = &raw[pos..end];
        let content = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        if content.is_empty() {
            return (fields, &raw[end..]);
        }
        if matches!(content[0], b' ' | b'\t') {
            if let Some((_, value)) = fields.last_mut() {
                value.push_str("\r\n");
                value.push_str(&String::from_utf8_lossy(content));
                pos = end;
                continue;
            }
            return (fields, &raw[pos..]);
        }
        let Some(colon) = content.iter().position(|&b| b == b':') else {
            return (fields, &raw[pos..]);
        };
        let name = &content[..colon];
        let name = name.trim_ascii_end();
        if name.is_empty() || !name.iter().all(|&b| b.is_ascii_graphic()) {
            return (fields, &raw[pos..]);
        }
        fields.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(&content[colon + 1..]).into_owned(),
        ));
        pos = end;
    }
    (fields, &raw[raw.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::milter::SmtpReply;
    use tokio::io::DuplexStream;

    /// The milter's end of the pipe.
    struct Fake(DuplexStream);

    impl Fake {
        async fn read(&mut self) -> (u8, Vec<u8>) {
            let mut h = [0u8; 4];
            self.0.read_exact(&mut h).await.unwrap();
            let mut p = vec![0u8; u32::from_be_bytes(h) as usize];
            self.0.read_exact(&mut p).await.unwrap();
            (p[0], p[1..].to_vec())
        }

        async fn expect(&mut self, code: u8, data: &[u8]) {
            let (c, d) = self.read().await;
            assert_eq!(
                (c as char, String::from_utf8_lossy(&d)),
                (code as char, String::from_utf8_lossy(data))
            );
        }

        async fn send(&mut self, code: u8, data: &[u8]) {
            let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
            p.push(code);
            p.extend_from_slice(data);
            self.0.write_all(&p).await.unwrap();
        }

        async fn negotiate(&mut self, actions: u32, protocol: u32, lists: &[(u32, &str)]) {
            let (c, d) = self.read().await;
            assert_eq!(c, b'O');
            assert_eq!(d, b"\0\0\0\x06\0\0\x01\xff\0\x1f\xf7\xff");
            let mut r = Vec::new();
            r.extend_from_slice(&6u32.to_be_bytes());
            r.extend_from_slice(&actions.to_be_bytes());
            r.extend_from_slice(&protocol.to_be_bytes());
            for (stage, list) in lists {
                r.extend_from_slice(&stage.to_be_bytes());
                r.extend_from_slice(list.as_bytes());
                r.push(0);
            }
            self.send(b'O', &r).await;
        }
    }

    fn pair() -> (Box<dyn Io>, Fake) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (Box::new(a), Fake(b))
    }

    fn options() -> MilterOptions {
        MilterOptions {
            timeout: Duration::from_secs(5),
            ..MilterOptions::default()
        }
    }

    fn connect_info() -> ConnectInfo {
        ConnectInfo {
            hostname: "mx.example.org".into(),
            daemon_name: "letterbox".into(),
            local: Some("192.0.2.1:25".parse().unwrap()),
            client: Some("198.51.100.7:40000".parse().unwrap()),
            client_name: None,
            client_ptr: Some("c.example.net".into()),
        }
    }

    fn mail_info() -> MailInfo {
        MailInfo {
            sender: "a@example.net".into(),
            args: vec!["SIZE=100".into()],
            queue_id: "Q1".into(),
            auth: None,
        }
    }

    fn rcpt_info() -> RcptInfo {
        RcptInfo {
            recipient: "b@example.org".into(),
            args: vec![],
        }
    }

    #[tokio::test]
    async fn sends_each_stage_with_its_macros_and_reads_edits() {
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            assert_eq!(
                m.connect_info(&connect_info()).await.unwrap(),
                Response::Continue
            );
            let helo = HeloInfo {
                name: "c.example.net".into(),
                tls: None,
            };
            assert_eq!(m.helo(&helo).await.unwrap(), Response::Continue);
            assert_eq!(m.mail(&mail_info()).await.unwrap(), Response::Continue);
            assert_eq!(m.rcpt(&rcpt_info()).await.unwrap(), Response::Continue);
            assert_eq!(m.data().await.unwrap(), Response::Continue);
            m.message(b"Subject: hi\r\n\tthere\r\nFrom: a@example.net\r\n\r\nbody\r\n")
                .await
                .unwrap()
        });
        f.negotiate(Actions::ALL.0, 0, &[]).await;
        f.expect(
            b'D',
            b"Cj\0mx.example.org\0{daemon_name}\0letterbox\0{daemon_addr}\x00192.0.2.1\0\
              {daemon_port}\x0025\0v\0letterbox 0.1.0\0_\0c.example.net [198.51.100.7]\0\
              {client_addr}\x00198.51.100.7\0{client_port}\x0040000\0{client_name}\0unknown\0\
              {client_ptr}\0c.example.net\0",
        )
        .await;
        f.expect(b'C', b"[198.51.100.7]\x004\x9c\x40198.51.100.7\0")
            .await;
        f.send(b'c', b"").await;
        f.expect(b'H', b"c.example.net\0").await;
        f.send(b'c', b"").await;
        f.expect(
            b'D',
            b"Mi\0Q1\0{mail_addr}\0a@example.net\0{mail_host}\0example.net\0",
        )
        .await;
        f.expect(b'M', b"<a@example.net>\0SIZE=100\0").await;
        f.send(b'c', b"").await;
        f.expect(
            b'D',
            b"Ri\0Q1\0{rcpt_addr}\0b@example.org\0{rcpt_host}\0example.org\0",
        )
        .await;
        f.expect(b'R', b"<b@example.org>\0").await;
        f.send(b'c', b"").await;
        f.expect(b'D', b"Ti\0Q1\0").await;
        f.expect(b'T', b"").await;
        f.send(b'c', b"").await;
        f.expect(b'L', b"Subject\0hi\n\tthere\0").await;
        f.send(b'c', b"").await;
        f.expect(b'L', b"From\0a@example.net\0").await;
        f.send(b'c', b"").await;
        f.expect(b'D', b"Ni\0Q1\0").await;
        f.expect(b'N', b"").await;
        f.send(b'c', b"").await;
        f.expect(b'B', b"body\r\n").await;
        f.send(b'c', b"").await;
        f.expect(b'D', b"Ei\0Q1\0").await;
        f.expect(b'E', b"").await;
        f.send(b'p', b"").await;
        f.send(b'h', b"X-Spam\0Yes\0").await;
        f.send(b'i', b"\0\0\0\0DKIM-Signature\0v=1;\n\tb=x\0").await;
        f.send(b'm', b"\0\0\0\0Subject\0\0").await;
        f.send(b'b', b"new ").await;
        f.send(b'b', b"body\r\n").await;
        f.send(b'2', b"<c@example.org>\0NOTIFY=NEVER\0").await;
        f.send(b'-', b"<b@example.org>\0").await;
        f.send(b'e', b"<d@example.net>\0").await;
        f.send(b'q', b"held\0").await;
        f.send(b'a', b"").await;
        let eom = milter.await.unwrap();
        assert_eq!(eom.response, Response::Quarantine("held".into()));
        assert_eq!(
            eom.modifications,
            vec![
                Modification::AddHeader {
                    name: "X-Spam".into(),
                    value: " Yes".into()
                },
                Modification::InsertHeader {
                    index: 0,
                    name: "DKIM-Signature".into(),
                    value: " v=1;\r\n\tb=x".into()
                },
                Modification::ChangeHeader {
                    index: 1,
                    name: "Subject".into(),
                    value: None
                },
                Modification::ReplaceBody(b"new body\r\n".to_vec()),
                Modification::AddRecipient {
                    recipient: "<c@example.org>".into(),
                    args: Some("NOTIFY=NEVER".into())
                },
                Modification::DeleteRecipient("<b@example.org>".into()),
                Modification::ChangeSender {
                    sender: "<d@example.net>".into(),
                    args: None
                },
            ]
        );
    }

    #[tokio::test]
    async fn skip_and_no_reply_flags_are_honoured() {
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            // None of these wait for an answer.
            assert_eq!(
                m.connect_info(&connect_info()).await.unwrap(),
                Response::Continue
            );
            assert_eq!(m.mail(&mail_info()).await.unwrap(), Response::Continue);
            assert_eq!(m.rcpt(&rcpt_info()).await.unwrap(), Response::Continue);
            assert_eq!(m.data().await.unwrap(), Response::Continue);
            assert_eq!(m.header("Subject", " x").await.unwrap(), Response::Continue);
            assert_eq!(m.end_of_headers().await.unwrap(), Response::Continue);
            assert_eq!(m.body(b"b\r\n").await.unwrap(), Response::Continue);
            m.end_of_message().await.unwrap()
        });
        let p = ProtocolFlags::NO_CONNECT
            | ProtocolFlags::NR_MAIL
            | ProtocolFlags::NO_RCPT
            | ProtocolFlags::NR_DATA
            | ProtocolFlags::NR_HEADER
            | ProtocolFlags::HEADER_LEADING_SPACE
            | ProtocolFlags::NO_EOH
            | ProtocolFlags::NO_BODY;
        // The milter wants {client_addr} at MAIL and nothing at RCPT.
        f.negotiate(Actions::ADD_HEADERS, p, &[(2, "{client_addr} i"), (3, "")])
            .await;
        // Connect skipped: its macros still go.
        let (c, d) = f.read().await;
        assert_eq!((c, d[0]), (b'D', b'C'));
        f.expect(b'D', b"M{client_addr}\x00198.51.100.7\0i\0Q1\0")
            .await;
        f.expect(b'M', b"<a@example.net>\0SIZE=100\0").await;
        f.expect(b'D', b"Ti\0Q1\0").await;
        f.expect(b'T', b"").await;
        // The leading space is kept, as negotiated.
        f.expect(b'L', b"Subject\0 x\0").await;
        f.expect(b'D', b"Ni\0Q1\0").await;
        f.expect(b'D', b"Ei\0Q1\0").await;
        f.expect(b'E', b"").await;
        f.send(b'h', b"X-Test\0 kept\0").await;
        f.send(b'c', b"").await;
        let eom = milter.await.unwrap();
        assert_eq!(eom.response, Response::Continue);
        assert_eq!(
            eom.modifications,
            vec![Modification::AddHeader {
                name: "X-Test".into(),
                value: " kept".into()
            }]
        );
    }

    #[tokio::test]
    async fn skip_stops_the_body_and_accept_ends_the_message() {
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            m.connect_info(&connect_info()).await.unwrap();
            m.mail(&mail_info()).await.unwrap();
            let body = vec![b'x'; MAX_BODY_CHUNK * 3];
            assert_eq!(m.body(&body).await.unwrap(), Response::Continue);
            assert_eq!(m.body(b"more").await.unwrap(), Response::Continue);
            let eom = m.end_of_message().await.unwrap();
            assert_eq!(eom.response, Response::Continue);
            // Second message: accepted at RCPT, nothing more is sent.
            m.mail(&mail_info()).await.unwrap();
            assert_eq!(m.rcpt(&rcpt_info()).await.unwrap(), Response::Accept);
            assert_eq!(m.rcpt(&rcpt_info()).await.unwrap(), Response::Continue);
            assert_eq!(m.body(b"x").await.unwrap(), Response::Continue);
            // A third MAIL aborts the accepted message first.
            m.mail(&mail_info()).await.unwrap();
            m.quit().await.unwrap();
        });
        let all_nr = ProtocolFlags::NR_CONNECT | ProtocolFlags::NR_MAIL;
        f.negotiate(0, all_nr, &[(0, ""), (2, "")]).await;
        f.expect(b'C', b"[198.51.100.7]\x004\x9c\x40198.51.100.7\0")
            .await;
        f.expect(b'M', b"<a@example.net>\0SIZE=100\0").await;
        let (c, d) = f.read().await;
        assert_eq!((c, d.len()), (b'B', MAX_BODY_CHUNK));
        f.send(b's', b"").await;
        f.expect(b'D', b"Ei\0Q1\0").await;
        f.expect(b'E', b"").await;
        f.send(b'c', b"").await;
        f.expect(b'M', b"<a@example.net>\0SIZE=100\0").await;
        f.expect(
            b'D',
            b"Ri\0Q1\0{rcpt_addr}\0b@example.org\0{rcpt_host}\0example.org\0",
        )
        .await;
        f.expect(b'R', b"<b@example.org>\0").await;
        f.send(b'a', b"").await;
        f.expect(b'A', b"").await;
        f.expect(b'M', b"<a@example.net>\0SIZE=100\0").await;
        f.expect(b'Q', b"").await;
        milter.await.unwrap();
    }

    #[tokio::test]
    async fn refusals_carry_their_replies_and_a_connection_refusal_sticks() {
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            m.connect_info(&connect_info()).await.unwrap();
            m.mail(&mail_info()).await.unwrap();
            let r = m.rcpt(&rcpt_info()).await.unwrap();
            assert_eq!(r.smtp_reply().unwrap().code, 550);
            // A rejected recipient leaves the message going.
            let r = m.rcpt(&rcpt_info()).await.unwrap();
            assert_eq!(
                r,
                Response::ReplyCode(SmtpReply {
                    code: 451,
                    enhanced: Some("4.7.1".into()),
                    text: "later".into()
                })
            );
            let r = m
                .helo(&HeloInfo {
                    name: "x".into(),
                    tls: None,
                })
                .await
                .unwrap();
            assert_eq!(r, Response::TempFail);
            // Every later stage gets the same refusal, with no I/O.
            assert_eq!(m.mail(&mail_info()).await.unwrap(), Response::TempFail);
        });
        f.negotiate(
            0,
            ProtocolFlags::NR_CONNECT | ProtocolFlags::NR_MAIL,
            &[(0, ""), (2, ""), (3, "")],
        )
        .await;
        f.expect(b'C', b"[198.51.100.7]\x004\x9c\x40198.51.100.7\0")
            .await;
        f.expect(b'M', b"<a@example.net>\0SIZE=100\0").await;
        f.expect(b'R', b"<b@example.org>\0").await;
        f.send(b'r', b"").await;
        f.expect(b'R', b"<b@example.org>\0").await;
        f.send(b'y', b"451 4.7.1 later\0").await;
        f.expect(b'A', b"").await;
        f.expect(b'H', b"x\0").await;
        f.send(b't', b"").await;
        milter.await.unwrap();
    }

    #[tokio::test]
    async fn protocol_violations_are_typed_errors_and_poison_the_connection() {
        // An edit before the end of the message.
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            let e = m.connect_info(&connect_info()).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    MilterError::Protocol {
                        during: "connect",
                        ..
                    }
                ),
                "{e}"
            );
            let e = m.mail(&mail_info()).await.unwrap_err();
            assert!(matches!(e, MilterError::Unusable), "{e}");
        });
        f.negotiate(Actions::ALL.0, 0, &[(0, "")]).await;
        f.read().await;
        f.send(b'h', b"X\0y\0").await;
        milter.await.unwrap();

        // An edit that was not negotiated.
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            m.connect_info(&connect_info()).await.unwrap();
            m.mail(&mail_info()).await.unwrap();
            m.end_of_message().await.unwrap_err()
        });
        f.negotiate(
            Actions::ADD_HEADERS,
            ProtocolFlags::NR_CONNECT | ProtocolFlags::NR_MAIL,
            &[],
        )
        .await;
        for _ in 0..4 {
            f.read().await;
        }
        f.send(b'-', b"<b@example.org>\0").await;
        let e = milter.await.unwrap();
        assert!(matches!(e, MilterError::Protocol { .. }), "{e}");

        // A newer protocol version, a bad first reply, an oversized packet.
        for (code, data) in [
            (b'O', &b"\0\0\0\x07\0\0\0\0\0\0\0\0"[..]),
            (b'c', b""),
            (b'O', b"\0\0\0\x06"),
        ] {
            let (io, mut f) = pair();
            let milter = tokio::spawn(Milter::over(io, options()));
            f.read().await;
            f.send(code, data).await;
            let e = milter.await.unwrap().unwrap_err();
            assert!(
                matches!(e, MilterError::Protocol { .. } | MilterError::Decode { .. }),
                "{e}"
            );
        }
        let (io, mut f) = pair();
        let milter = tokio::spawn(Milter::over(
            io,
            MilterOptions {
                max_reply_packet: 8,
                ..options()
            },
        ));
        f.read().await;
        f.send(b'O', &[0; 12]).await;
        let e = milter.await.unwrap().unwrap_err();
        assert!(matches!(e, MilterError::Decode { .. }), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_milter_times_out() {
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            let start = Instant::now();
            let e = m.connect_info(&connect_info()).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    MilterError::Timeout {
                        during: "connect",
                        ..
                    }
                ),
                "{e}"
            );
            assert_eq!(start.elapsed(), Duration::from_secs(5));
        });
        f.negotiate(0, 0, &[]).await;
        milter.await.unwrap();
        drop(f);

        // Progress packets keep a slow milter alive.
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            m.connect_info(&connect_info()).await.unwrap()
        });
        f.negotiate(0, 0, &[(0, "")]).await;
        f.read().await;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            f.send(b'p', b"").await;
        }
        f.send(b'c', b"").await;
        assert_eq!(milter.await.unwrap(), Response::Continue);
    }

    #[tokio::test]
    async fn out_of_order_stages_are_refused() {
        let (io, mut f) = pair();
        let milter = tokio::spawn(async move {
            let mut m = Milter::over(io, options()).await.unwrap();
            let e = m.mail(&mail_info()).await.unwrap_err();
            assert!(
                matches!(e, MilterError::OutOfOrder { stage: "mail" }),
                "{e}"
            );
            m.connect_info(&connect_info()).await.unwrap();
            let e = m.rcpt(&rcpt_info()).await.unwrap_err();
            assert!(
                matches!(e, MilterError::OutOfOrder { stage: "rcpt" }),
                "{e}"
            );
            let e = m.connect_info(&connect_info()).await.unwrap_err();
            assert!(matches!(e, MilterError::OutOfOrder { .. }), "{e}");
        });
        f.negotiate(0, ProtocolFlags::NR_CONNECT, &[(0, "")]).await;
        f.read().await;
        milter.await.unwrap();
    }

    #[test]
    fn messages_split_into_fields_and_body() {
        let (f, b) = split_message(b"A: 1\r\nB:2\r\n  more\r\n\r\nbody\r\n");
        assert_eq!(
            f,
            vec![
                ("A".into(), " 1".into()),
                ("B".into(), "2\r\n  more".into())
            ]
        );
        assert_eq!(b, b"body\r\n");
        let (f, b) = split_message(b"A: 1\r\nnot a header\r\n");
        assert_eq!(f.len(), 1);
        assert_eq!(b, b"not a header\r\n");
        let (f, b) = split_message(b"A: 1\nB: 2\n");
        assert_eq!(f.len(), 2);
        assert!(b.is_empty());
    }

    #[test]
    fn header_values_get_a_space_and_crlf() {
        assert_eq!(header_value("v=1;\n\tb=x", false), " v=1;\r\n\tb=x");
        assert_eq!(header_value(" v=1;\r\n\tb=x", true), " v=1;\r\n\tb=x");
    }
}
