//! Reading commands from a terminal: line editing, an in-memory history and completion of
//! command names, as qemu-io's own readline gives. Input that is not a terminal is read line
//! by line without any of this (scripts see exactly qemu-io's prompt and output).

use super::help::COMMANDS;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

/// Completes the first word of a line with command names.
struct CommandNames;

impl Completer for CommandNames {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        let start = head.len() - head.trim_start().len();
        let word = &head[start..];
        if word.contains(' ') {
            return Ok((pos, Vec::new()));
        }
        let names = COMMANDS
            .iter()
            .filter(|c| c.name.starts_with(word))
            .map(|c| Pair {
                display: c.name.to_string(),
                replacement: format!("{} ", c.name),
            })
            .collect();
        Ok((start, names))
    }
}

impl Hinter for CommandNames {
    type Hint = String;
}
impl Highlighter for CommandNames {}
impl Validator for CommandNames {}
impl Helper for CommandNames {}

/// A terminal's line editor.
pub(super) struct Terminal {
    /// Lent to the blocking thread while it waits for a line.
    editor: Option<Editor<CommandNames, DefaultHistory>>,
}

impl Terminal {
    /// The editor for standard input, or `None` when it is not a terminal (or the terminal
    /// cannot be set up: then lines are read plainly).
    pub(super) fn open() -> Option<Terminal> {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return None;
        }
        let mut editor = Editor::<CommandNames, DefaultHistory>::new().ok()?;
        editor.set_helper(Some(CommandNames));
        Some(Terminal {
            editor: Some(editor),
        })
    }

    /// Shows `prompt` and reads one edited line; `None` at the end of the input (Ctrl-D) or on
    /// Ctrl-C, which end the session as its end of input does: the image is closed cleanly.
    /// The wait happens on a blocking thread, so asynchronous requests keep completing.
    pub(super) async fn read_line(&mut self, prompt: String) -> std::io::Result<Option<String>> {
        let Some(mut editor) = self.editor.take() else {
            return Ok(None);
        };
        let (editor, read) = tokio::task::spawn_blocking(move || {
            let read = editor.readline(&prompt);
            (editor, read)
        })
        .await
        .map_err(std::io::Error::other)?;
        self.editor = Some(editor);
        match read {
            Ok(line) => {
                if let Some(editor) = &mut self.editor {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                }
                Ok(Some(line))
            }
            Err(ReadlineError::Eof | ReadlineError::Interrupted) => Ok(None),
            Err(ReadlineError::Io(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}
