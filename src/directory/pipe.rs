//! Pipe destinations: an alias destination `|/path/to/program arg…` hands
//! each copy of a message to that program on its standard input (Postfix
//! local(8)'s "pipe to procmail"; `delivery/pipe.rs` runs it). Only the
//! admin CLI stores one, as an alias row: nothing a client sends can name a
//! pipe (local parts never start with `|`, see `address.rs`).
//!
//! The command is argv split on whitespace and run without a shell: there is
//! no quoting, no variables, no redirection and no pipeline. Characters that
//! would mean something to a shell are refused when the alias is added
//! rather than passed on literally, so a command written for a shell fails
//! at once, in front of the operator, instead of misbehaving when mail
//! arrives. Anything fancier belongs in a script.

use super::DirectoryError;

/// What marks a destination as a pipe.
pub const MARK: char = '|';

/// The aliases table's destination column holds 255 characters on MySQL.
pub const MAX_CHARS: usize = 255;

/// Characters a shell would interpret; a pipe command may not hold them.
const SHELL_CHARS: &[char] = &['"', '\'', '\\', '`', '$', ';', '&', '|', '<', '>'];

/// Whether an alias destination is a pipe.
pub fn is_pipe(destination: &str) -> bool {
    destination.starts_with(MARK)
}

/// Validates a pipe destination as the operator wrote it and returns its
/// stored form: `|` and the arguments joined by single spaces.
pub fn normalize(destination: &str) -> Result<String, DirectoryError> {
    let bad = |m: String| Err(DirectoryError::Conflict(m));
    let command = destination.strip_prefix(MARK).unwrap_or(destination);
    if command.chars().any(|c| c.is_control() && c != '\t') {
        return bad(format!(
            "pipe destination {destination:?} contains a control character"
        ));
    }
    if let Some(c) = command.chars().find(|c| SHELL_CHARS.contains(c)) {
        return bad(format!(
            "pipe destination {destination:?} contains {c:?}: no shell runs it, so quoting, variables, redirection and pipelines do not work; put them in a script"
        ));
    }
    let argv: Vec<&str> = command.split_whitespace().collect();
    let Some(program) = argv.first() else {
        return bad(format!("pipe destination {destination:?} names no command"));
    };
    if !program.starts_with('/') {
        return bad(format!(
            "pipe command {program:?} must be an absolute path (no PATH is searched)"
        ));
    }
    let stored = format!("{MARK}{}", argv.join(" "));
    let n = stored.chars().count();
    if n > MAX_CHARS {
        return bad(format!(
            "pipe destination is {n} characters; at most {MAX_CHARS} fit: put the command in a script"
        ));
    }
    Ok(stored)
}

/// The argv of a stored pipe destination; None when it names no command.
pub fn argv(stored: &str) -> Option<Vec<String>> {
    let argv: Vec<String> = stored
        .strip_prefix(MARK)?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (!argv.is_empty()).then_some(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(d: &str) -> String {
        normalize(d).unwrap_err().to_string()
    }

    #[test]
    fn stored_form_is_argv_joined_by_single_spaces() {
        assert_eq!(
            normalize("|/usr/local/bin/tracker   --project\tweb ").unwrap(),
            "|/usr/local/bin/tracker --project web"
        );
        assert_eq!(
            argv("|/usr/bin/procmail -m /etc/letterbox/alice.rc").unwrap(),
            ["/usr/bin/procmail", "-m", "/etc/letterbox/alice.rc"]
        );
        assert_eq!(argv("|  "), None);
        assert_eq!(argv("alice@example.org"), None);
    }

    #[test]
    fn shell_syntax_relative_paths_and_long_commands_are_refused() {
        assert_eq!(refused("|"), "pipe destination \"|\" names no command");
        assert_eq!(
            refused("|procmail"),
            "pipe command \"procmail\" must be an absolute path (no PATH is searched)"
        );
        for (d, c) in [
            ("|/bin/x > /tmp/y", '>'),
            ("|/bin/x \"a b\"", '"'),
            ("|/bin/x $HOME", '$'),
            ("|/bin/x | /bin/y", '|'),
            ("|/bin/x; rm", ';'),
            ("|/bin/x 'a'", '\''),
        ] {
            assert_eq!(
                refused(d),
                format!(
                    "pipe destination {d:?} contains {c:?}: no shell runs it, so quoting, variables, redirection and pipelines do not work; put them in a script"
                )
            );
        }
        assert_eq!(
            refused("|/bin/x\na"),
            "pipe destination \"|/bin/x\\na\" contains a control character"
        );
        let long = format!("|/bin/{}", "x".repeat(250));
        assert_eq!(
            refused(&long),
            "pipe destination is 256 characters; at most 255 fit: put the command in a script"
        );
    }
}
