//! A policy request: every attribute Postfix's SMTP server sends, in its
//! order, as `name=value` lines ended by an empty line.
//!
//! Attributes letterbox does not know are still sent, empty (or 0), as
//! Postfix does when a value is unavailable: servers written for Postfix
//! may expect every name to be there.

use std::fmt::Write as _;
use std::net::IpAddr;

/// The SMTP stage a request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolState {
    /// The client connected.
    Connect,
    /// EHLO.
    Ehlo,
    /// HELO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// Greylisting servers answer here, where sender, recipient and
    /// client form their triplet.
    #[default]
    Rcpt,
    /// The DATA command (and BDAT).
    Data,
    /// After the message's final dot.
    EndOfMessage,
    /// VRFY (letterbox has none).
    Vrfy,
    /// ETRN (letterbox has none).
    Etrn,
}

impl ProtocolState {
    /// The value of `protocol_state`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolState::Connect => "CONNECT",
            ProtocolState::Ehlo => "EHLO",
            ProtocolState::Helo => "HELO",
            ProtocolState::Mail => "MAIL",
            ProtocolState::Rcpt => "RCPT",
            ProtocolState::Data => "DATA",
            ProtocolState::EndOfMessage => "END-OF-MESSAGE",
            ProtocolState::Vrfy => "VRFY",
            ProtocolState::Etrn => "ETRN",
        }
    }
}

/// Everything a policy server may be told about the session at one
/// stage. Empty strings and `None` are sent as empty values.
#[derive(Debug, Clone, Default)]
pub struct PolicyRequest {
    /// `protocol_state`: the stage being decided.
    pub protocol_state: ProtocolState,
    /// `protocol_name`: `ESMTP` after EHLO, `SMTP` after HELO.
    pub protocol_name: String,
    /// `helo_name`: the HELO/EHLO argument.
    pub helo_name: String,
    /// `queue_id`: the transaction id, to tie the server's log to ours.
    pub queue_id: String,
    /// `sender`: the MAIL FROM address without brackets; empty for `<>`.
    pub sender: String,
    /// `recipient`: the RCPT TO address at RCPT (and at DATA or
    /// END-OF-MESSAGE when there is exactly one).
    pub recipient: String,
    /// `recipient_count`: accepted recipients, non-zero only at DATA and
    /// END-OF-MESSAGE.
    pub recipient_count: u32,
    /// `client_address`: the SMTP client's IP address.
    pub client_address: Option<IpAddr>,
    /// `client_port`: the SMTP client's TCP port.
    pub client_port: Option<u16>,
    /// `client_name`: the verified (forward-confirmed) client name; sent
    /// as `unknown` when there is none, as Postfix does.
    pub client_name: Option<String>,
    /// `reverse_client_name`: the client's PTR name, verified or not;
    /// `unknown` when there is none.
    pub reverse_client_name: Option<String>,
    /// `instance`: the same for every request about one message, so a
    /// server can tie RCPT and END-OF-MESSAGE together.
    pub instance: String,
    /// `sasl_method`: the AUTH mechanism, if the client logged in.
    pub sasl_method: String,
    /// `sasl_username`: the login name.
    pub sasl_username: String,
    /// `sasl_sender`: the MAIL FROM `AUTH=` parameter.
    pub sasl_sender: String,
    /// `size`: the SIZE= of MAIL FROM, or the real size at END-OF-MESSAGE.
    pub size: u64,
    /// `ccert_subject`: a verified client certificate's subject CN (sent
    /// xtext-encoded, as Postfix does).
    pub ccert_subject: String,
    /// `ccert_issuer`: its issuer CN (xtext-encoded on the wire).
    pub ccert_issuer: String,
    /// `ccert_fingerprint`: the certificate's fingerprint.
    pub ccert_fingerprint: String,
    /// `ccert_pubkey_fingerprint`: its public key's fingerprint.
    pub ccert_pubkey_fingerprint: String,
    /// `encryption_protocol`: e.g. `TLSv1.3`; empty in plaintext.
    pub encryption_protocol: String,
    /// `encryption_cipher`: the cipher suite; empty in plaintext.
    pub encryption_cipher: String,
    /// `encryption_keysize`: symmetric key bits; 0 in plaintext.
    pub encryption_keysize: u32,
    /// `tls_sni`: the server name the client asked for in TLS.
    pub tls_sni: String,
    /// `etrn_domain`: the ETRN argument (letterbox has no ETRN).
    pub etrn_domain: String,
    /// `stress`: `yes` when the server is overloaded.
    pub stress: bool,
    /// `server_address`: the local address the client connected to.
    pub server_address: Option<IpAddr>,
    /// `server_port`: the local port the client connected to.
    pub server_port: Option<u16>,
    /// `policy_context`: free text from the configuration, to tell one
    /// use of the same server from another.
    pub policy_context: String,
    /// `compatibility_level`: sent only when set; it describes Postfix's
    /// configuration, which letterbox has none of.
    pub compatibility_level: Option<String>,
    /// `mail_version`: sent only when set; servers that compare it with
    /// Postfix versions would be misled by letterbox's.
    pub mail_version: Option<String>,
}

impl PolicyRequest {
    /// The request on the wire, `request=smtpd_access_policy` first and an
    /// empty line last. A CR, LF or NUL inside a value (which would end
    /// the line or the request early) becomes a space.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::with_capacity(1024);
        let mut put = |name: &str, value: &str| {
            s.push_str(name);
            s.push('=');
            s.extend(value.chars().map(|c| match c {
                '\r' | '\n' | '\0' => ' ',
                c => c,
            }));
            s.push('\n');
        };
        let opt_ip = |a: Option<IpAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        let opt_port = |p: Option<u16>| p.map(|p| p.to_string()).unwrap_or_default();
        let unknown = |n: &Option<String>| n.clone().unwrap_or_else(|| "unknown".into());
        put("request", "smtpd_access_policy");
        put("protocol_state", self.protocol_state.as_str());
        put("protocol_name", &self.protocol_name);
        put("client_address", &opt_ip(self.client_address));
        put("client_name", &unknown(&self.client_name));
        put("client_port", &opt_port(self.client_port));
        put("reverse_client_name", &unknown(&self.reverse_client_name));
        put("server_address", &opt_ip(self.server_address));
        put("server_port", &opt_port(self.server_port));
        put("helo_name", &self.helo_name);
        put("sender", &self.sender);
        put("recipient", &self.recipient);
        put("recipient_count", &self.recipient_count.to_string());
        put("queue_id", &self.queue_id);
        put("instance", &self.instance);
        put("size", &self.size.to_string());
        put("etrn_domain", &self.etrn_domain);
        put("stress", if self.stress { "yes" } else { "" });
        put("sasl_method", &self.sasl_method);
        put("sasl_username", &self.sasl_username);
        put("sasl_sender", &self.sasl_sender);
        put("ccert_subject", &xtext(&self.ccert_subject));
        put("ccert_issuer", &xtext(&self.ccert_issuer));
        put("ccert_fingerprint", &self.ccert_fingerprint);
        put("ccert_pubkey_fingerprint", &self.ccert_pubkey_fingerprint);
        put("encryption_protocol", &self.encryption_protocol);
        put("encryption_cipher", &self.encryption_cipher);
        put("encryption_keysize", &self.encryption_keysize.to_string());
        put("tls_sni", &self.tls_sni);
        put("policy_context", &self.policy_context);
        if let Some(v) = &self.compatibility_level {
            put("compatibility_level", v);
        }
        if let Some(v) = &self.mail_version {
            put("mail_version", v);
        }
        s.push('\n');
        s.into_bytes()
    }
}

/// RFC 3461 xtext: `+`, `=`, and bytes outside `!`..`~` as `+XX`.
fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_attribute_in_order() {
        let r = PolicyRequest {
            protocol_state: ProtocolState::Rcpt,
            protocol_name: "ESMTP".into(),
            helo_name: "c.example.net".into(),
            queue_id: "Q1".into(),
            sender: "a@example.net".into(),
            recipient: "b@example.org".into(),
            recipient_count: 0,
            client_address: Some("192.0.2.7".parse().unwrap()),
            client_port: Some(40000),
            client_name: None,
            reverse_client_name: Some("c.example.net".into()),
            instance: "Q1.1".into(),
            size: 1234,
            ccert_subject: "Wietse Venema".into(),
            encryption_protocol: "TLSv1.3".into(),
            encryption_cipher: "TLS_AES_128_GCM_SHA256".into(),
            encryption_keysize: 128,
            server_address: Some("2001:db8::1".parse().unwrap()),
            server_port: Some(25),
            policy_context: "inbound".into(),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            "request=smtpd_access_policy\n\
             protocol_state=RCPT\n\
             protocol_name=ESMTP\n\
             client_address=192.0.2.7\n\
             client_name=unknown\n\
             client_port=40000\n\
             reverse_client_name=c.example.net\n\
             server_address=2001:db8::1\n\
             server_port=25\n\
             helo_name=c.example.net\n\
             sender=a@example.net\n\
             recipient=b@example.org\n\
             recipient_count=0\n\
             queue_id=Q1\n\
             instance=Q1.1\n\
             size=1234\n\
             etrn_domain=\n\
             stress=\n\
             sasl_method=\n\
             sasl_username=\n\
             sasl_sender=\n\
             ccert_subject=Wietse+20Venema\n\
             ccert_issuer=\n\
             ccert_fingerprint=\n\
             ccert_pubkey_fingerprint=\n\
             encryption_protocol=TLSv1.3\n\
             encryption_cipher=TLS_AES_128_GCM_SHA256\n\
             encryption_keysize=128\n\
             tls_sni=\n\
             policy_context=inbound\n\
             \n"
        );
    }

    #[test]
    fn values_cannot_break_lines_and_optional_ones_appear_when_set() {
        let r = PolicyRequest {
            protocol_state: ProtocolState::EndOfMessage,
            helo_name: "evil\r\nrecipient=x@y\n\nrequest=x\0".into(),
            stress: true,
            compatibility_level: Some("3.6".into()),
            mail_version: Some("3.7.11".into()),
            ..Default::default()
        };
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.contains("\nhelo_name=evil  recipient=x@y  request=x \n"));
        assert!(text.contains("\nprotocol_state=END-OF-MESSAGE\n"));
        assert!(text.contains("\nstress=yes\n"));
        assert!(text.ends_with("\ncompatibility_level=3.6\nmail_version=3.7.11\n\n"));
        assert_eq!(
            text.matches("\n\n").count(),
            1,
            "one blank line, at the end"
        );
    }

    #[test]
    fn states_are_named_as_postfix_names_them() {
        let all = [
            (ProtocolState::Connect, "CONNECT"),
            (ProtocolState::Ehlo, "EHLO"),
            (ProtocolState::Helo, "HELO"),
            (ProtocolState::Mail, "MAIL"),
            (ProtocolState::Rcpt, "RCPT"),
            (ProtocolState::Data, "DATA"),
            (ProtocolState::EndOfMessage, "END-OF-MESSAGE"),
            (ProtocolState::Vrfy, "VRFY"),
            (ProtocolState::Etrn, "ETRN"),
        ];
        for (s, name) in all {
            assert_eq!(s.as_str(), name);
        }
    }

    #[test]
    fn xtext_encodes_plus_equals_and_non_printables() {
        assert_eq!(xtext("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
    }
}
