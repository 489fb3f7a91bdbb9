//! How a process of the local runtime ended, as a type (not the text a driver printed): an
//! exit code, a signal, or a process that could not be followed to its end; and the one
//! conversion to the exit code a shell reports.

use std::fmt;

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
    /// rack stopped it to start it again (a `restart`).
    Restarted,
    /// It could not be followed to its end; why.
    Lost(String),
}

impl Exit {
    /// How a child process ended, from its wait.
    pub fn of(status: std::io::Result<std::process::ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => Self::Code(code),
                (None, Some(signal)) => Self::Signal(signal),
                (None, None) => Self::Lost(status.to_string()),
            },
            Err(e) => Self::Lost(e.to_string()),
        }
    }

    /// The exit code as a shell reports it: 128 + the signal for a killed process, 1 when it
    /// is not known.
    pub fn code(&self) -> i32 {
        match self {
            Self::Code(code) => *code,
            Self::Signal(signal) => 128 + signal,
            Self::Restarted | Self::Lost(_) => 1,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit status: {code}"),
            Self::Signal(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(name) => write!(f, "signal: {signal} ({})", name.as_str()),
                Err(_) => write!(f, "signal: {signal}"),
            },
            Self::Restarted => f.write_str("restarted on request"),
            Self::Lost(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Exit;

    #[test]
    fn exit_codes_read_as_a_shell_reports_them() {
        assert_eq!(Exit::Code(3).code(), 3);
        assert_eq!(Exit::Code(0).code(), 0);
        assert_eq!(Exit::Signal(9).code(), 137);
        assert_eq!(Exit::Lost("lost: podman died".into()).code(), 1);
    }

    #[test]
    fn it_reads_as_the_standard_library_says_it() {
        assert_eq!(Exit::Code(3).to_string(), "exit status: 3");
        assert_eq!(Exit::Signal(9).to_string(), "signal: 9 (SIGKILL)");
        assert_eq!(Exit::Restarted.to_string(), "restarted on request");
    }

    #[test]
    fn a_child_that_was_killed_is_a_signal() {
        use std::os::unix::process::ExitStatusExt;
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(Exit::of(Ok(killed)), Exit::Signal(9));
        let exited = std::process::ExitStatus::from_raw(3 << 8);
        assert_eq!(Exit::of(Ok(exited)), Exit::Code(3));
    }
}
