//! RCPT TO (RFC 5321 §4.1.1.3). The protocol's own rules are checked here;
//! where the recipient goes, and whether it may, is the pipeline's.

use tokio::io::{AsyncRead, AsyncWrite};

use super::session::Session;
use crate::pipeline::Stage;
use crate::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn rcpt(&mut self, to: String) -> Reply {
        let reply = self.check_rcpt(&to).await;
        if let Some(tx) = &mut self.tx {
            tx.rcpt_log.push((to, reply.code));
        }
        reply
    }

    async fn check_rcpt(&mut self, to: &str) -> Reply {
        let Some(tx) = &self.tx else {
            return Reply::bad_sequence("Need MAIL command");
        };
        // Once content has begun the recipients are fixed: how it is kept
        // (on disk, or in memory within the sink's bounds) was chosen for them.
        if tx.bdat.is_some() {
            return Reply::bad_sequence("RCPT not allowed during BDAT transfer");
        }
        // Duplicates count: LMTP owes each accepted RCPT a reply.
        if tx.accepted.len() >= self.config().smtp.max_recipients {
            return Reply::too_many_recipients();
        }
        if !to.is_ascii() && !tx.smtputf8 {
            return Reply::need_utf8();
        }
        // A logged-in user (submission) may relay; anyone else reaches
        // our own domains only.
        let resolved = match self.auth {
            Some(_) => self.pipeline.relay_recipient(to).await,
            None => self.pipeline.recipient(to).await,
        };
        let recipient = match resolved {
            Ok(r) => r,
            Err(refusal) => return Reply::from(&refusal),
        };
        let decision = self.stage(Stage::Rcpt, Some(&recipient), None).await;
        let tx = self.tx.as_mut().expect("checked above");
        if let Err(reply) = decision.apply(&mut tx.effects) {
            return reply;
        }
        let index = match tx
            .recipients
            .iter()
            .position(|r| r.address == recipient.address)
        {
            Some(i) => i,
            None => {
                tx.recipients.push(recipient);
                tx.recipients.len() - 1
            }
        };
        tx.accepted.push(index);
        self.accepted(Stage::Rcpt).await;
        Reply::recipient_ok()
    }
}
