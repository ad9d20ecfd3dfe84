//! MAIL FROM (RFC 5321 §4.1.1.2).

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::command::MailFrom;
use super::session::{Session, Transaction};
use crate::envelope;
use crate::pipeline::Stage;
use crate::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn mail(&mut self, from: MailFrom) -> Reply {
        if self.helo.is_none() {
            return Reply::bad_sequence("Send EHLO or HELO first");
        }
        if self.tx.is_some() {
            return Reply::bad_sequence("Nested MAIL command");
        }
        // A submission port takes mail from logged-in users only.
        if self.conn.submission && self.auth.is_none() {
            return Reply::auth_required();
        }
        // AUTH= only where AUTH is offered (RFC 4954 §5); its value is
        // ignored.
        if from.auth && !(self.conn.submission && self.conn.tls.is_some()) {
            return Reply::unsupported_parameter("AUTH");
        }
        if from
            .size
            .is_some_and(|s| s > self.config().smtp.max_message_size.0)
        {
            return Reply::message_too_big_declared();
        }
        // The sender lands in Return-Path: no control characters.
        if from.address.chars().any(char::is_control) {
            return Reply::bad_sender();
        }
        if !from.address.is_ascii() && !from.smtputf8 {
            return Reply::need_utf8();
        }
        if let Some(user) = &self.auth {
            match self.pipeline.may_send_as(user, &from.address).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(ip = %self.conn.ip, %user, from = %from.address, "sender not owned by the user");
                    return Reply::sender_not_owned();
                }
                Err(e) => {
                    tracing::error!(error = %e, "directory lookup for the sender failed");
                    return Reply::directory_unavailable();
                }
            }
        }
        self.tx = Some(Transaction {
            started: Instant::now(),
            id: envelope::new_id(),
            sender: from.address,
            smtputf8: from.smtputf8,
            recipients: Vec::new(),
            accepted: Vec::new(),
            rcpt_log: Vec::new(),
            effects: self.conn.effects.clone(),
            bdat: None,
            spf: Default::default(),
        });
        let decision = self.stage(Stage::Mail, None, None).await;
        let tx = self.tx.as_mut().expect("begun above");
        if let Err(reply) = decision.apply(&mut tx.effects) {
            self.end_transaction();
            return reply;
        }
        Reply::sender_ok()
    }
}
