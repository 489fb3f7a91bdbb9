//! What rack reads of a Dockerfile before podman sees it: the build arguments it declares, and
//! the `RUN --mount` options that could name a place outside the build context.
//!
//! The mount check is one of several walls, not the only one: `RUN` steps also run in a user
//! namespace whose root is an unprivileged host user, in a copy of the context that holds no
//! link leading out of it (see `context`). It exists because buildah has had bugs in exactly
//! this place (a cache `id` of `../../..` resolved against the host's root), and rack must not
//! depend on the builder being free of them.

/// The names of the build arguments a Dockerfile declares (`ARG NAME` or `ARG NAME=default`).
pub fn declared_args(dockerfile: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in logical_lines(dockerfile) {
        let line = line.trim();
        let Some((instruction, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if !instruction.eq_ignore_ascii_case("ARG") {
            continue;
        }
        for arg in rest.split_whitespace() {
            let name = arg.split_once('=').map_or(arg, |(name, _)| name);
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// The images a Dockerfile's `FROM`s name (its earlier stages, `scratch` and `--platform`
/// aside), as written: a `$` in one means it is known only at build time.
pub fn from_images(dockerfile: &str) -> Vec<String> {
    let mut stages: Vec<String> = Vec::new();
    let mut images = Vec::new();
    for line in logical_lines(dockerfile) {
        let mut words = line.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            continue;
        }
        let mut words = words.filter(|w| !w.starts_with("--"));
        let Some(image) = words.next() else { continue };
        let known_here = image.eq_ignore_ascii_case("scratch") || stages.iter().any(|s| s.eq_ignore_ascii_case(image));
        if !known_here && !images.iter().any(|i| i == image) {
            images.push(image.to_owned());
        }
        if words.next().is_some_and(|w| w.eq_ignore_ascii_case("AS")) {
            stages.extend(words.next().map(str::to_owned));
        }
    }
    images
}

/// Refuses a Dockerfile whose `--mount` options could lead out of the build context: a cache
/// `id`, a `source` or a `from` that climbs with `..`, starts at `/` (for an `id`), or holds a
/// `$` (a build argument could make it anything). Names the line of the offending instruction.
///
/// # Errors
/// What is wrong, and where.
pub fn check_mounts(dockerfile: &str) -> Result<(), String> {
    let escape = escape_char(dockerfile);
    let mut number = 0;
    let mut lines = dockerfile.lines().peekable();
    while let Some(first) = lines.next() {
        number += 1;
        let start = number;
        let mut logical = first.to_owned();
        // A continued instruction goes on past empty lines and comments, as buildah reads it.
        while logical.trim_end().ends_with(escape) {
            let trimmed = logical.trim_end();
            logical.truncate(trimmed.len() - escape.len_utf8());
            let Some(next) = lines.next() else { break };
            number += 1;
            let trimmed = next.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                logical.push(escape);
                continue;
            }
            logical.push_str(next);
        }
        check_instruction(&logical).map_err(|e| format!("line {start}: {e}"))?;
    }
    Ok(())
}

/// Checks the `--mount` flags of one instruction (`RUN`, or `ONBUILD RUN`).
fn check_instruction(line: &str) -> Result<(), String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(word) = words.next() {
        let lower = word.to_ascii_lowercase();
        let value = if let Some(value) = lower.strip_prefix("--mount=") {
            &word[word.len() - value.len()..]
        } else if lower == "--mount" {
            match words.next() {
                Some(value) => value,
                None => break,
            }
        } else {
            continue;
        };
        check_mount(value)?;
    }
    Ok(())
}

/// Checks one mount's options (`type=cache,id=x,target=/y`).
fn check_mount(options: &str) -> Result<(), String> {
    for option in options.split(',') {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let key = key.trim().to_ascii_lowercase();
        if !matches!(key.as_str(), "id" | "source" | "src" | "from") {
            continue;
        }
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        if value.contains('$') {
            return Err(format!(
                "--mount {key}={value}: a variable is not allowed there (name the {key} literally)"
            ));
        }
        if value.split(['/', '\\']).any(|part| part == "..") {
            return Err(format!(
                "--mount {key}={value}: `..` would lead out of the build context"
            ));
        }
        if key == "id" && value.starts_with('/') {
            return Err(format!("--mount id={value}: a cache id is a name, not a path"));
        }
    }
    Ok(())
}

/// The Dockerfile with one `LABEL` instruction of `labels` appended (it applies to the last
/// stage, the image built, as `podman build --label` does): podman 4.3 (buildah 1.28) turns each `--label`
/// into a step of its own, each committed, and one instruction is one commit. `None` when
/// appending could change what the Dockerfile says (its last line continues onto the next, or
/// a label holds anything but a name's characters); the caller passes `--label`s then.
pub fn with_labels(dockerfile: &str, labels: &[(&str, &str)]) -> Option<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '/'))
    };
    if labels.is_empty() || !labels.iter().all(|(k, v)| plain(k) && plain(v)) {
        return None;
    }
    let escape = escape_char(dockerfile);
    let last = dockerfile
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    if last.trim_end().ends_with(escape) {
        return None;
    }
    let mut text = dockerfile.to_owned();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("LABEL");
    for (key, value) in labels {
        text.push_str(&format!(" \"{key}\"=\"{value}\""));
    }
    text.push('\n');
    Some(text)
}

/// The Dockerfile's escape character: `\`, or what a leading `# escape=` directive says.
fn escape_char(dockerfile: &str) -> char {
    for line in dockerfile.lines() {
        let line = line.trim();
        let Some(directive) = line.strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = directive.split_once('=') else {
            break;
        };
        if key.trim().eq_ignore_ascii_case("escape") {
            return value.trim().chars().next().unwrap_or('\\');
        }
    }
    '\\'
}

/// Whether the Dockerfile runs commands (a `RUN`, or an `ONBUILD` that could be one). Read
/// generously: a heredoc line that reads `RUN` counts too, which only costs the fast path.
pub fn runs_commands(dockerfile: &str) -> bool {
    logical_lines(dockerfile).iter().any(|line| {
        let word = line.split_whitespace().next().unwrap_or_default();
        word.eq_ignore_ascii_case("run") || word.eq_ignore_ascii_case("onbuild")
    })
}

/// The Dockerfile's instructions, continuation lines joined.
fn logical_lines(dockerfile: &str) -> Vec<String> {
    let escape = escape_char(dockerfile);
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim_end();
        if let Some(head) = trimmed.strip_suffix(escape) {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(line);
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dockerfile_without_run_runs_no_commands() {
        assert!(!super::runs_commands("FROM x\nCOPY a /a\nCMD [\"a\"]\n"));
        assert!(!super::runs_commands(
            "# run something\nFROM x AS run\nCOPY --from=run /a /a\n"
        ));
        assert!(super::runs_commands("FROM x\nrun make\n"));
        assert!(super::runs_commands("FROM x\n  RUN \\\n  make\n"));
        assert!(super::runs_commands("FROM x\nONBUILD RUN make\n"));
        assert!(super::runs_commands("FROM x\nCOPY <<EOF /a\nRUN\nEOF\n"));
    }

    #[test]
    fn labels_are_one_instruction_at_the_end_unless_that_could_change_the_dockerfile() {
        let labels = [("rack.app", "web"), ("rack.build", "BABC-1")];
        assert_eq!(
            super::with_labels("FROM x\nCOPY a /a", &labels).as_deref(),
            Some("FROM x\nCOPY a /a\nLABEL \"rack.app\"=\"web\" \"rack.build\"=\"BABC-1\"\n")
        );
        assert_eq!(super::with_labels("FROM x\nRUN a \\\n\n", &labels), None);
        assert_eq!(super::with_labels("# escape=`\nFROM x\nRUN a `\n", &labels), None);
        assert!(super::with_labels("# escape=`\nFROM x\nRUN a \\\n", &labels).is_some());
        assert_eq!(super::with_labels("FROM x\n", &[("rack.app", "a b")]), None);
        assert_eq!(super::with_labels("FROM x\n", &[("rack.app", "a\"b")]), None);
    }

    #[test]
    fn from_images_are_the_images_a_dockerfile_starts_from() {
        let text = "FROM --platform=linux/amd64 127.0.0.1:5000/base:1 AS build\nRUN make\n\
                    FROM build AS test\nFROM scratch\nFROM debian AS debian\nFROM Build\n";
        assert_eq!(super::from_images(text), ["127.0.0.1:5000/base:1", "debian"]);
    }

    use super::*;

    #[test]
    fn declared_build_arguments_are_found() {
        let dockerfile =
            "FROM scratch\nARG GREETING\narg RELEASE=none\nRUN echo $GREETING\n  ARG A=1 B\n# ARG NOT\nARG \\\n  C\n";
        assert_eq!(declared_args(dockerfile), ["GREETING", "RELEASE", "A", "B", "C"]);
    }

    #[test]
    fn mounts_inside_the_context_pass() {
        let ok = "FROM busybox\n\
                  RUN --mount=type=cache,target=/root/.npm npm ci\n\
                  RUN --mount=type=cache,id=npm-cache,target=/c true\n\
                  RUN --mount=type=bind,source=src/app,target=/app ls /app\n\
                  RUN --mount=type=bind,from=builder,source=/out,target=/o cp -r /o /x\n\
                  RUN echo '../../..' and $HOME\n";
        assert_eq!(check_mounts(ok), Ok(()));
    }

    #[test]
    fn mounts_that_could_leave_the_context_are_refused() {
        for (dockerfile, says) in [
            (
                "FROM b\nRUN --mount=type=cache,id=../../../../var/lib/rack,target=/h cat /h/password\n",
                "line 2: --mount id=../../../../var/lib/rack",
            ),
            (
                "FROM b\nRUN --mount=type=cache,id=/etc,target=/h true\n",
                "line 2: --mount id=/etc",
            ),
            (
                "FROM b\nRUN --MOUNT=type=bind,source=a/../../x,target=/h true\n",
                "line 2: --mount source=",
            ),
            (
                "FROM b\nRUN --mount type=bind,src=..,target=/h true\n",
                "line 2: --mount src=..",
            ),
            (
                "FROM b\nARG X\nRUN --mount=type=cache,id=$X,target=/h true\n",
                "line 3: --mount id=$X",
            ),
            (
                "FROM b\nONBUILD RUN --mount=type=cache,id=..,target=/h true\n",
                "line 2: --mount id=..",
            ),
            // Split over continuation lines, with a comment in between, as buildah joins them.
            (
                "FROM b\nRUN --mount=type=cache,id=.\\\n# a comment\n./x,target=/h true\n",
                "line 2: --mount id=../x",
            ),
            (
                "# escape=`\nFROM b\nRUN --mount=type=cache,id=.`\n./x,target=/h true\n",
                "line 3: --mount id=../x",
            ),
        ] {
            let error = check_mounts(dockerfile).expect_err(dockerfile);
            assert!(error.starts_with(says), "{dockerfile:?}: {error}");
        }
    }
}
