//! The interactive view of `lcache image analyze` on a terminal (ratatui): the layers on
//! the left — line, size, instruction — and on the right the image's files as they stand
//! after the selected layer, as a tree, with what that layer added (green), modified
//! (yellow) and removed (red). Keys: ↑/↓ (j/k) move, Tab switches pane, Enter folds a
//! directory, `c` shows only the layer's changes, `q` quits.

use std::collections::{BTreeMap, BTreeSet};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, ListState, Paragraph};
use ratatui::Frame;

use crate::image_views::human_size;
use crate::layer_analysis::{Analysis, Entry, LayerTree};

/// How a path stands after the selected layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Untouched by the layer.
    Same,
    /// New in it.
    Added,
    /// Written again by it.
    Modified,
    /// Removed by it.
    Removed,
}

/// One row of the file tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The path.
    pub path: String,
    /// How deep it is.
    pub depth: usize,
    /// Its entry (the removed one's last version for a removal).
    pub entry: Entry,
    /// What the layer did to it.
    pub change: Change,
}

/// Which pane has the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    /// The layer list.
    Layers,
    /// The file tree.
    Files,
}

/// Everything the view shows and where the user is.
pub struct ViewState {
    analysis: Analysis,
    /// The image after each layer: path → (entry, change by that layer).
    stacks: Vec<BTreeMap<String, (Entry, Change)>>,
    /// The selected layer.
    pub layer: usize,
    /// The selected row of the tree.
    pub row: usize,
    /// Which pane moves.
    pub pane: Pane,
    /// Show only what the layer changed.
    pub only_changes: bool,
    /// Folded directories.
    pub folded: BTreeSet<String>,
    /// Whether to leave.
    pub done: bool,
}

impl ViewState {
    /// The view of `analysis`, whose layers read as `trees`.
    pub fn new(analysis: Analysis, trees: &[LayerTree]) -> Self {
        let mut stacks = Vec::new();
        let mut image: BTreeMap<String, Entry> = BTreeMap::new();
        for (i, tree) in trees.iter().enumerate() {
            let mut view: BTreeMap<String, (Entry, Change)> = BTreeMap::new();
            let report = analysis.layers.get(i);
            let removed: BTreeSet<&String> = report.map(|r| r.removed.iter().collect()).unwrap_or_default();
            for (p, e) in &image {
                let gone = removed.iter().any(|r| p == *r || p.starts_with(&format!("{r}/")));
                view.insert(
                    p.clone(),
                    (e.clone(), if gone { Change::Removed } else { Change::Same }),
                );
            }
            for e in &tree.entries {
                let change = match view.get(&e.path) {
                    // A directory written again as it was is no change (runtimes leave them).
                    Some((old, Change::Same)) if e.kind == "dir" && old == e => Change::Same,
                    Some((_, Change::Same | Change::Modified)) => Change::Modified,
                    _ => Change::Added,
                };
                view.insert(e.path.clone(), (e.clone(), change));
            }
            image = view
                .iter()
                .filter(|(_, (_, c))| *c != Change::Removed)
                .map(|(p, (e, _))| (p.clone(), e.clone()))
                .collect();
            stacks.push(view);
        }
        Self {
            analysis,
            stacks,
            layer: 0,
            row: 0,
            pane: Pane::Layers,
            only_changes: false,
            folded: BTreeSet::new(),
            done: false,
        }
    }

    /// The tree rows the selected layer shows.
    pub fn rows(&self) -> Vec<Row> {
        let Some(stack) = self.stacks.get(self.layer) else {
            return Vec::new();
        };
        stack
            .iter()
            .filter(|(p, (_, c))| {
                (!self.only_changes || *c != Change::Same)
                    && !self.folded.iter().any(|f| p.starts_with(&format!("{f}/")))
            })
            .map(|(p, (e, c))| Row {
                path: p.clone(),
                depth: p.matches('/').count(),
                entry: e.clone(),
                change: *c,
            })
            .collect()
    }

    /// Applies one key.
    pub fn key(&mut self, code: KeyCode) {
        let layers = self.stacks.len();
        let rows = self.rows().len();
        match (code, self.pane) {
            (KeyCode::Char('q') | KeyCode::Esc, _) => self.done = true,
            (KeyCode::Tab, Pane::Layers) => self.pane = Pane::Files,
            (KeyCode::Tab, Pane::Files) => self.pane = Pane::Layers,
            (KeyCode::Char('c'), _) => {
                self.only_changes = !self.only_changes;
                self.row = 0;
            }
            (KeyCode::Down | KeyCode::Char('j'), Pane::Layers) if self.layer + 1 < layers => {
                self.layer += 1;
                self.row = 0;
            }
            (KeyCode::Up | KeyCode::Char('k'), Pane::Layers) if self.layer > 0 => {
                self.layer -= 1;
                self.row = 0;
            }
            (KeyCode::Down | KeyCode::Char('j'), Pane::Files) if self.row + 1 < rows => self.row += 1,
            (KeyCode::Up | KeyCode::Char('k'), Pane::Files) if self.row > 0 => self.row -= 1,
            (KeyCode::PageDown, Pane::Files) => self.row = (self.row + 20).min(rows.saturating_sub(1)),
            (KeyCode::PageUp, Pane::Files) => self.row = self.row.saturating_sub(20),
            (KeyCode::Enter | KeyCode::Char(' '), Pane::Files) => {
                if let Some(r) = self.rows().get(self.row) {
                    if r.entry.kind == "dir" && !self.folded.remove(&r.path) {
                        self.folded.insert(r.path.clone());
                    }
                }
            }
            _ => {}
        }
    }

    /// Draws the view.
    pub fn draw(&self, f: &mut Frame) {
        let [top, body, help] =
            Layout::vertical([Constraint::Length(2), Constraint::Min(3), Constraint::Length(1)]).areas(f.area());
        let a = &self.analysis;
        f.render_widget(
            Paragraph::new(format!(
                "{}   efficiency {:.2} %   wasted {} ({:.1} % of what the Dockerfile added)",
                a.image,
                a.efficiency * 100.0,
                human_size(a.wasted_bytes),
                a.user_wasted_percent * 100.0
            )),
            top,
        );
        let [left, right] = Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(body);
        let active = |p: Pane| {
            if self.pane == p {
                Style::default().fg(Color::Cyan)
            } else {
                Style::default()
            }
        };
        let layer_items: Vec<ListItem> = a
            .layers
            .iter()
            .map(|l| {
                ListItem::new(format!(
                    "{:>4} {:>8}  {}",
                    l.line.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                    human_size(l.size),
                    if l.created_by.is_empty() {
                        "(base)"
                    } else {
                        &l.created_by
                    }
                ))
            })
            .collect();
        let mut layer_state = ListState::default().with_selected(Some(self.layer));
        f.render_stateful_widget(
            List::new(layer_items)
                .block(
                    Block::default()
                        .borders(Borders::ALL)
                        .title("Layers")
                        .border_style(active(Pane::Layers)),
                )
                .highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
            left,
            &mut layer_state,
        );
        let rows = self.rows();
        let items: Vec<ListItem> = rows
            .iter()
            .map(|r| {
                let (mark, color) = match r.change {
                    Change::Same => (" ", Color::Reset),
                    Change::Added => ("+", Color::Green),
                    Change::Modified => ("~", Color::Yellow),
                    Change::Removed => ("-", Color::Red),
                };
                let name = r.path.rsplit('/').next().unwrap_or(&r.path);
                let fold = if self.folded.contains(&r.path) { "▸ " } else { "" };
                ListItem::new(Line::from(vec![
                    Span::styled(
                        format!("{mark} {:>8} ", human_size(r.entry.size)),
                        Style::default().fg(color),
                    ),
                    Span::styled(
                        format!("{:o} {}:{} ", r.entry.mode, r.entry.uid, r.entry.gid),
                        Style::default().fg(Color::DarkGray),
                    ),
                    Span::styled(
                        format!(
                            "{}{fold}{name}{}",
                            "  ".repeat(r.depth),
                            if r.entry.kind == "dir" { "/" } else { "" }
                        ),
                        Style::default().fg(color),
                    ),
                ]))
            })
            .collect();
        let mut file_state = ListState::default().with_selected((!rows.is_empty()).then_some(self.row));
        let title = if self.only_changes {
            "Files (changes only)"
        } else {
            "Files"
        };
        f.render_stateful_widget(
            List::new(items)
                .block(
                    Block::default()
                        .borders(Borders::ALL)
                        .title(title)
                        .border_style(active(Pane::Files)),
                )
                .highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
            right,
            &mut file_state,
        );
        f.render_widget(
            Paragraph::new("↑/↓ move · Tab switch pane · Enter fold · c only changes · q quit"),
            help,
        );
    }
}

/// Runs the view on the terminal until `q`.
pub fn run(mut state: ViewState) -> std::io::Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| {
        while !state.done {
            terminal.draw(|f| state.draw(f))?;
            if let Event::Key(k) = event::read()? {
                if k.kind == KeyEventKind::Press {
                    state.key(k.code);
                }
            }
        }
        Ok(())
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::layer_analysis::analyze;

    fn file(path: &str, size: u64) -> Entry {
        Entry::file(path, size)
    }

    fn screen(state: &ViewState) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 20)).unwrap();
        t.draw(|f| state.draw(f)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn layers_step_through_and_only_changes_filters_the_tree() {
        let trees = vec![
            LayerTree {
                entries: vec![
                    Entry {
                        kind: "dir",
                        ..file("etc", 0)
                    },
                    file("etc/passwd", 300),
                    file("bin/sh", 1000),
                ],
                ..Default::default()
            },
            LayerTree {
                entries: vec![file("app", 50), file("etc/passwd", 320)],
                removed: vec!["bin/sh".into()],
                ..Default::default()
            },
        ];
        let made_by = [
            (String::new(), None),
            ("RUN /bin/sh -c setup # buildkit".into(), Some(2)),
        ];
        let a = analyze("img:1", &trees, &made_by);
        let mut v = ViewState::new(a, &trees);
        assert!(screen(&v).contains("(base)") && screen(&v).contains("passwd"));
        v.key(KeyCode::Down);
        assert_eq!(v.layer, 1);
        let rows = v.rows();
        let change = |p: &str| rows.iter().find(|r| r.path == p).map(|r| r.change);
        assert_eq!(change("app"), Some(Change::Added));
        assert_eq!(change("etc/passwd"), Some(Change::Modified));
        assert_eq!(change("bin/sh"), Some(Change::Removed));
        assert_eq!(change("etc"), Some(Change::Same));
        v.key(KeyCode::Char('c'));
        assert_eq!(v.rows().len(), 3, "only what the layer changed");
        let s = screen(&v);
        assert!(
            s.contains("changes only") && s.contains("setup") && !s.contains(" etc/"),
            "{s}"
        );
        v.key(KeyCode::Char('c'));
        v.key(KeyCode::Tab);
        v.key(KeyCode::Enter);
        assert!(v.folded.contains("app") || v.folded.is_empty(), "only directories fold");
        while v.rows().get(v.row).is_some_and(|r| r.path != "etc") {
            v.key(KeyCode::Down);
        }
        v.key(KeyCode::Enter);
        assert!(
            !v.rows().iter().any(|r| r.path == "etc/passwd"),
            "a folded directory hides its files"
        );
        v.key(KeyCode::Char('q'));
        assert!(v.done);
    }
}
