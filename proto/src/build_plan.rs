//! From a parsed Dockerfile, build args and a target to the effective definition of every
//! filesystem step: ARG/ENV scoping across stages as BuildKit does it, substitution,
//! WORKDIR/USER/SHELL in effect, stage references and `--target` pruning.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::dockerfile::Dockerfile;
use crate::errors::DockerfileError;
use crate::instruction::{Command, Instruction, InstructionKind};
use crate::platform::Platform;
use crate::run_mount::{self, RunMount};
use crate::word_expansion::{expand_word, ExpandError, Vars};

/// What a build is asked to do.
#[derive(Clone)]
pub struct PlanRequest<'a> {
    /// `--build-arg` values; a `None` value means "take it from the environment" was not
    /// resolved and the arg is treated as not given.
    pub build_args: &'a BTreeMap<String, String>,
    /// `--target` stage name, or the last stage.
    pub target: Option<&'a str>,
    /// The platform to build for.
    pub platform: Platform,
    /// The base images' configs, where known.
    pub bases: &'a dyn BaseImages,
}

/// The PATH BuildKit puts first in a stage's environment when its base image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a stage takes from its base image's config, as BuildKit does: ENV (for
/// substitution and RUN), WORKDIR, USER and SHELL in effect from the start, and the
/// ONBUILD triggers it runs first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseConfig {
    /// `NAME=value`, in the image's order.
    pub env: Vec<String>,
    /// USER, or empty.
    pub user: String,
    /// WorkingDir, or empty (`/`).
    pub workdir: String,
    /// SHELL, or empty (`/bin/sh -c`).
    pub shell: Vec<String>,
    /// ONBUILD triggers, as written.
    pub onbuild: Vec<String>,
}

impl BaseConfig {
    /// The environment a stage starts with: the image's, with [`DEFAULT_PATH`] first if it
    /// sets no PATH (BuildKit writes that into the image config too).
    pub fn env_with_path(&self) -> Vec<String> {
        let mut env = self.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, format!("PATH={DEFAULT_PATH}"));
        }
        env
    }
}

/// The configs of base images, looked up while planning (lcached answers from the images it
/// holds; offline nothing is known, and a base's config then counts as empty).
pub trait BaseImages {
    /// The config of the image `reference` names, if it is known.
    fn config(&self, reference: &str) -> Option<BaseConfig>;
}

/// No base image is known.
pub struct NoBaseImages;

impl BaseImages for NoBaseImages {
    fn config(&self, _: &str) -> Option<BaseConfig> {
        None
    }
}

/// Where a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Base {
    /// `FROM scratch`: the empty filesystem.
    Scratch,
    /// An image by reference.
    Image {
        /// The reference after substitution.
        reference: String,
    },
    /// An earlier stage's result.
    Stage {
        /// The stage's index.
        index: usize,
    },
}

/// Where COPY/ADD reads from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CopyFrom {
    /// The build context.
    Context,
    /// Another stage's result.
    Stage {
        /// The stage's index.
        index: usize,
    },
    /// An image's filesystem.
    Image {
        /// The reference.
        reference: String,
    },
}

/// A file that a heredoc makes (COPY) or feeds (RUN).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineFile {
    /// The heredoc delimiter, which is the file's name in COPY.
    pub name: String,
    /// The body after substitution (COPY, unquoted delimiter) or as written.
    pub content: String,
    /// Whether the body is subject to expansion (unquoted delimiter).
    pub expand: bool,
}

/// A RUN step's effective definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDef {
    /// The command to execute: exec form as is, shell form wrapped by SHELL.
    pub argv: Vec<String>,
    /// Heredoc bodies the command reads.
    pub heredocs: Vec<InlineFile>,
    /// ENV values and declared ARGs with values, sorted by name.
    pub env: Vec<(String, String)>,
    /// WORKDIR in effect.
    pub workdir: String,
    /// USER in effect (empty: the image's default).
    pub user: String,
    /// `--mount` values as written after substitution.
    pub mounts: Vec<String>,
    /// `--network` (`default` unless given).
    pub network: String,
    /// `--security` (`sandbox` unless given).
    pub security: String,
    /// The `--mount=type=bind`s, in order: their content is in the key.
    #[serde(default)]
    pub binds: Vec<BindDef>,
}

/// A RUN's `--mount=type=bind`, resolved: what it shows and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindDef {
    /// Absolute path in the RUN's filesystem.
    pub target: String,
    /// The path within `from` (`.` for its root).
    pub source: String,
    /// The context, a stage or an image.
    pub from: CopyFrom,
    /// Writable (the writes are discarded).
    pub readwrite: bool,
}

impl BindDef {
    /// The selection it makes, as the COPY of its source to `/` that shows the same files.
    pub fn selection(&self) -> CopyDef {
        let mut c = CopyDef::from_context(&[self.source.as_str()], "/");
        c.from = self.from.clone();
        c
    }
}

/// A COPY or ADD step's effective definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyDef {
    /// ADD rather than COPY.
    pub add: bool,
    /// Where the sources come from.
    pub from: CopyFrom,
    /// Source paths or patterns after substitution (heredocs excluded).
    pub sources: Vec<String>,
    /// Heredoc sources.
    pub inline: Vec<InlineFile>,
    /// Destination, resolved against WORKDIR (a trailing `/` kept).
    pub dest: String,
    /// `--chown` value.
    pub chown: String,
    /// `--chmod` value.
    pub chmod: String,
    /// `--link`.
    pub link: bool,
    /// `--exclude` patterns.
    pub excludes: Vec<String>,
    /// `--parents`.
    pub parents: bool,
    /// ADD `--checksum`.
    pub checksum: String,
    /// ADD `--keep-git-dir`.
    pub keep_git_dir: bool,
}

impl CopyDef {
    /// A plain `COPY SOURCES… DEST` from the context, with no flags.
    pub fn from_context(sources: &[&str], dest: &str) -> Self {
        Self {
            add: false,
            from: CopyFrom::Context,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            inline: vec![],
            dest: dest.to_string(),
            chown: String::new(),
            chmod: String::new(),
            link: false,
            excludes: vec![],
            parents: false,
            checksum: String::new(),
            keep_git_dir: false,
        }
    }
}

/// What a filesystem step does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepDef {
    /// RUN.
    Run(RunDef),
    /// COPY or ADD.
    Copy(CopyDef),
    /// WORKDIR: creates the directory.
    Workdir {
        /// The absolute path.
        path: String,
        /// The USER in effect, who owns the directories it creates (as in Docker).
        #[serde(default)]
        user: String,
    },
}

/// A filesystem step of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    /// 1-based first line.
    pub line: usize,
    /// 1-based last line.
    pub end_line: usize,
    /// As written, continuations joined.
    pub instruction: String,
    /// The effective definition.
    pub def: StepDef,
}

/// An image-config change, in Dockerfile order (values substituted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConfigChange {
    /// ENV name=value.
    Env {
        /// Name.
        name: String,
        /// Value.
        value: String,
    },
    /// CMD (shell form already wrapped by SHELL).
    Cmd {
        /// The command.
        args: Vec<String>,
    },
    /// ENTRYPOINT (shell form already wrapped by SHELL).
    Entrypoint {
        /// The command.
        args: Vec<String>,
    },
    /// WORKDIR (absolute).
    Workdir {
        /// The path.
        path: String,
    },
    /// USER.
    User {
        /// `user[:group]`.
        user: String,
    },
    /// EXPOSE, ports normalised to `N/proto`.
    Expose {
        /// The ports.
        ports: Vec<String>,
    },
    /// LABEL (and MAINTAINER as the `maintainer` label).
    Label {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// VOLUME.
    Volume {
        /// Paths.
        paths: Vec<String>,
    },
    /// STOPSIGNAL.
    Stopsignal {
        /// The signal.
        signal: String,
    },
    /// HEALTHCHECK (`["NONE"]` disables).
    Healthcheck {
        /// `["CMD", …]`, `["CMD-SHELL", cmd]` or `["NONE"]`.
        test: Vec<String>,
        /// Option flags as written (`interval=30s`…).
        options: Vec<(String, String)>,
    },
    /// SHELL.
    Shell {
        /// The shell array.
        args: Vec<String>,
    },
    /// ONBUILD (the trigger as written).
    Onbuild {
        /// The deferred instruction.
        instruction: String,
    },
}

/// A stage of the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStage {
    /// 0-based index.
    pub index: usize,
    /// The AS name, lower case.
    pub name: Option<String>,
    /// 1-based line of its FROM.
    pub line: usize,
    /// Where it starts.
    pub base: Base,
    /// The platform it builds for.
    pub platform: String,
    /// Its filesystem steps.
    pub steps: Vec<PlannedStep>,
    /// Its image-config changes, in order.
    pub config: Vec<ConfigChange>,
    /// What each instruction after FROM adds to the image's history, in BuildKit's words,
    /// in order; those with `layer` are the steps, one for one.
    #[serde(default)]
    pub history: Vec<HistoryLine>,
    /// Whether the target needs it (false: pruned by `--target`).
    pub needed: bool,
}

/// One instruction's entry in the image config's `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryLine {
    /// 1-based line of the instruction.
    pub line: usize,
    /// BuildKit's `created_by` (`RUN |1 A=b /bin/sh -c … # buildkit`, `ENV A=b`).
    pub created_by: String,
    /// Whether it made a layer (a step).
    pub layer: bool,
}

/// Go's `%q` of a string list, as BuildKit writes CMD and ENTRYPOINT: `["a" "b"]`.
fn go_quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| {
            let mut q = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => q.push_str("\\\""),
                    '\\' => q.push_str("\\\\"),
                    '\n' => q.push_str("\\n"),
                    '\t' => q.push_str("\\t"),
                    '\r' => q.push_str("\\r"),
                    c if c.is_control() => q.push_str(&format!("\\x{:02x}", c as u32)),
                    c => q.push(c),
                }
            }
            q.push('"');
            q
        })
        .collect();
    format!("[{}]", quoted.join(" "))
}

/// Every stage's steps, ready for key derivation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildPlan {
    /// All stages; those the target does not need have `needed: false`.
    pub stages: Vec<PlannedStage>,
    /// Index of the target stage.
    pub target: usize,
    /// Things the user should know that do not stop the build.
    pub warnings: Vec<String>,
}

impl BuildPlan {
    /// Stages to build, dependencies before dependants.
    pub fn needed_stages(&self) -> impl Iterator<Item = &PlannedStage> {
        self.stages.iter().filter(|s| s.needed)
    }
}

/// The ENV, ARGs and image settings in effect at a point of a stage.
#[derive(Debug, Clone, Default)]
struct Scope {
    env: BTreeMap<String, String>,
    args: BTreeMap<String, Option<String>>,
    /// The stage's ARGs in the order they were declared (BuildKit lists them so in RUN's
    /// history).
    arg_order: Vec<String>,
    workdir: String,
    user: String,
    shell: Vec<String>,
}

impl Vars for Scope {
    fn get(&self, name: &str) -> Option<&str> {
        // ENV always wins over an ARG of the same name.
        self.env
            .get(name)
            .map(String::as_str)
            .or_else(|| self.args.get(name).and_then(|v| v.as_deref()))
    }
}

struct Planner<'a> {
    df: &'a Dockerfile,
    req: &'a PlanRequest<'a>,
    global: Scope,
    consumed: BTreeSet<String>,
    warnings: Vec<String>,
}

/// Plans a build: every needed stage's filesystem steps with their effective definitions.
pub fn plan(df: &Dockerfile, req: &PlanRequest<'_>) -> Result<BuildPlan, DockerfileError> {
    let mut p = Planner {
        df,
        req,
        global: Scope::default(),
        consumed: BTreeSet::new(),
        warnings: Vec::new(),
    };
    // BuildKit makes the platform args available to FROM lines without a declaration.
    let build_platform = Platform::host();
    for (k, v) in req
        .platform
        .automatic_args("TARGET")
        .into_iter()
        .chain(build_platform.automatic_args("BUILD"))
    {
        p.global.args.insert(k, Some(v));
    }
    let automatic = p.global.args.clone();

    let mut stages: Vec<PlannedStage> = Vec::new();
    let mut scopes: Vec<Scope> = Vec::new();
    let mut deps: Vec<BTreeSet<usize>> = Vec::new();
    let mut i = 0;
    let ins = &df.instructions;
    while i < ins.len() && matches!(ins[i].kind, InstructionKind::Arg { .. }) {
        p.declare_args(&ins[i], None)?;
        i += 1;
    }
    while i < ins.len() {
        let from = &ins[i];
        let InstructionKind::From { image, name } = &from.kind else {
            // Dockerfile::parse guarantees a FROM here.
            return Err(p.err(from, "expected FROM".into(), "start the stage with FROM"));
        };
        let mut end = i + 1;
        while end < ins.len() && !matches!(ins[end].kind, InstructionKind::From { .. }) {
            end += 1;
        }
        let index = stages.len();
        let reference = expand_word(image, p.escape(), &p.global).map_err(|e| p.expand_err(from, e))?;
        if reference.is_empty() {
            return Err(p.err(
                from,
                format!("FROM '{image}' expands to an empty image name"),
                "set the ARG it uses with --build-arg or give it a default",
            ));
        }
        // A stage name is not an image reference; anything else must be one, as in Docker.
        let names_stage = stages
            .iter()
            .any(|s| s.name.as_deref() == Some(reference.to_ascii_lowercase().as_str()));
        if !names_stage && !reference.eq_ignore_ascii_case("scratch") {
            if let Err(why) = crate::image_reference::check(&reference) {
                return Err(p.err(
                    from,
                    format!("FROM '{image}' expands to '{reference}': {why}"),
                    if image.contains('$') {
                        "set the ARG it uses with --build-arg or give it a default"
                    } else {
                        "write the image as [registry/]name[:tag][@sha256:digest], lower case"
                    },
                ));
            }
        }
        let platform = match from.flag("platform") {
            Some(v) => {
                let v = expand_word(v, p.escape(), &p.global).map_err(|e| p.expand_err(from, e))?;
                Platform::parse(&v).ok_or_else(|| {
                    p.err(
                        from,
                        format!("invalid platform '{v}'"),
                        "write --platform=os/arch[/variant], e.g. linux/arm64",
                    )
                })?
            }
            None => req.platform.clone(),
        };
        let base = if reference.eq_ignore_ascii_case("scratch") {
            Base::Scratch
        } else if let Some(j) = stages
            .iter()
            .position(|s| s.name.as_deref() == Some(reference.to_ascii_lowercase().as_str()))
        {
            Base::Stage { index: j }
        } else {
            Base::Image {
                reference: reference.clone(),
            }
        };
        let base_config = match &base {
            Base::Image { reference } => req.bases.config(reference).unwrap_or_default(),
            _ => BaseConfig::default(),
        };
        let mut scope = match &base {
            // A stage built on another inherits its image config, never its ARGs.
            Base::Stage { index } => Scope {
                args: BTreeMap::new(),
                arg_order: Vec::new(),
                ..scopes[*index].clone()
            },
            _ => Scope {
                shell: if base_config.shell.is_empty() {
                    vec!["/bin/sh".into(), "-c".into()]
                } else {
                    base_config.shell.clone()
                },
                workdir: if base_config.workdir.is_empty() {
                    "/".into()
                } else {
                    base_config.workdir.clone()
                },
                user: base_config.user.clone(),
                env: base_config
                    .env_with_path()
                    .iter()
                    .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                    .collect(),
                ..Scope::default()
            },
        };
        let triggers = p.onbuild_triggers(from, &reference, &base_config.onbuild)?;
        let mut stage_deps = BTreeSet::new();
        if let Base::Stage { index } = base {
            stage_deps.insert(index);
        }
        let mut steps = Vec::new();
        let mut config = Vec::new();
        let mut history = Vec::new();
        for ins in triggers.iter().chain(&ins[i + 1..end]) {
            let changes = p.config_changes(ins, &scope)?;
            let step = p.step(ins, &mut scope, &stages, name.as_deref(), &mut stage_deps, &automatic)?;
            history.extend(p.history_line(ins, &changes, step.as_ref(), &scope)?);
            config.extend(changes);
            steps.extend(step);
        }
        stages.push(PlannedStage {
            index,
            name: name.clone(),
            line: from.line,
            base,
            platform: platform.to_string(),
            steps,
            config,
            history,
            needed: false,
        });
        scopes.push(scope);
        deps.push(stage_deps);
        i = end;
    }

    let target = match req.target {
        None => stages.len() - 1,
        Some(t) => stages
            .iter()
            .position(|s| s.name.as_deref() == Some(t.to_ascii_lowercase().as_str()))
            .ok_or_else(|| {
                let names: Vec<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
                DockerfileError::new(
                    &df.file,
                    1,
                    1,
                    format!("target stage '{t}' is not in the Dockerfile"),
                    if names.is_empty() {
                        "name a stage with FROM <image> AS <name>".to_string()
                    } else {
                        format!("stages are: {}", names.join(", "))
                    },
                )
            })?,
    };
    mark_needed(&mut stages, &deps, target, df)?;
    let unused: Vec<&String> = req
        .build_args
        .keys()
        .filter(|k| !p.consumed.contains(*k) && !automatic.contains_key(*k))
        .collect();
    if !unused.is_empty() {
        p.warnings.push(format!(
            "build args not declared by any ARG, so they change nothing: {}",
            unused.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(BuildPlan {
        stages,
        target,
        warnings: p.warnings,
    })
}

/// Marks the target and everything it depends on as needed; refuses cycles.
fn mark_needed(
    stages: &mut [PlannedStage],
    deps: &[BTreeSet<usize>],
    target: usize,
    df: &Dockerfile,
) -> Result<(), DockerfileError> {
    // 0 = unvisited, 1 = on the current path, 2 = done.
    fn visit(i: usize, deps: &[BTreeSet<usize>], state: &mut [u8], path: &mut Vec<usize>) -> Result<(), Vec<usize>> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                let start = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(i);
                return Err(cycle);
            }
            _ => {}
        }
        state[i] = 1;
        path.push(i);
        for &d in &deps[i] {
            visit(d, deps, state, path)?;
        }
        path.pop();
        state[i] = 2;
        Ok(())
    }
    let mut state = vec![0u8; stages.len()];
    if let Err(cycle) = visit(target, deps, &mut state, &mut Vec::new()) {
        let label = |i: usize| stages[i].name.clone().unwrap_or_else(|| i.to_string());
        let first = cycle[0];
        return Err(DockerfileError::new(
            &df.file,
            stages[first].line,
            1,
            format!(
                "stages depend on each other in a cycle: {}",
                cycle.iter().map(|&i| label(i)).collect::<Vec<_>>().join(" → ")
            ),
            "a stage can only use the result of a stage that does not use it",
        ));
    }
    for (i, s) in stages.iter_mut().enumerate() {
        s.needed = state[i] == 2;
    }
    Ok(())
}

impl Planner<'_> {
    /// A base image's ONBUILD triggers as instructions at the FROM line, run before the
    /// stage's own (Docker refuses FROM, MAINTAINER and ONBUILD as triggers).
    fn onbuild_triggers(
        &self,
        from: &Instruction,
        reference: &str,
        triggers: &[String],
    ) -> Result<Vec<Instruction>, DockerfileError> {
        if triggers.is_empty() {
            return Ok(Vec::new());
        }
        let text = format!("FROM scratch\n{}\n", triggers.join("\n"));
        let parsed = Dockerfile::parse(&self.df.file, &text).map_err(|e| {
            self.err(
                from,
                format!(
                    "the ONBUILD triggers of base image {reference} do not parse: {}",
                    e.message
                ),
                "fix or rebuild the base image",
            )
        })?;
        let mut out = Vec::new();
        for mut t in parsed.instructions.into_iter().skip(1) {
            if matches!(
                t.kind,
                InstructionKind::From { .. } | InstructionKind::Maintainer { .. } | InstructionKind::Onbuild { .. }
            ) {
                return Err(self.err(
                    from,
                    format!(
                        "base image {reference} has the ONBUILD trigger '{}', which Docker does not allow",
                        t.written
                    ),
                    "rebuild the base image without it",
                ));
            }
            t.line = from.line;
            t.end_line = from.line;
            t.column = from.column;
            out.push(t);
        }
        Ok(out)
    }

    fn escape(&self) -> char {
        self.df.directives.escape
    }

    fn err(&self, ins: &Instruction, message: String, hint: &str) -> DockerfileError {
        DockerfileError::new(&self.df.file, ins.line, ins.column, message, hint)
    }

    fn expand_err(&self, ins: &Instruction, e: ExpandError) -> DockerfileError {
        self.err(
            ins,
            format!("cannot substitute variables: {e}"),
            "check the ${…} syntax; supported: $V ${V} ${V:-default} ${V:+alt} ${V:?message}",
        )
    }

    fn expand(&self, ins: &Instruction, s: &str, scope: &Scope) -> Result<String, DockerfileError> {
        expand_word(s, self.escape(), scope).map_err(|e| self.expand_err(ins, e))
    }

    /// ARG in the global scope (`stage` None) or in a stage.
    fn declare_args(
        &mut self,
        ins: &Instruction,
        stage: Option<(&mut Scope, &BTreeMap<String, Option<String>>)>,
    ) -> Result<(), DockerfileError> {
        let InstructionKind::Arg { args } = &ins.kind else {
            return Ok(());
        };
        match stage {
            None => {
                for (name, default) in args {
                    let value = match self.req.build_args.get(name) {
                        Some(v) => Some(v.clone()),
                        None => match default {
                            Some(d) => Some(self.expand(ins, d, &self.global.clone())?),
                            None => None,
                        },
                    };
                    self.consumed.insert(name.clone());
                    self.global.args.insert(name.clone(), value);
                }
            }
            Some((scope, automatic)) => {
                for (name, default) in args {
                    let value = match self.req.build_args.get(name) {
                        Some(v) => Some(v.clone()),
                        None => match default {
                            Some(d) => Some(self.expand(ins, d, scope)?),
                            // `ARG NAME` in a stage takes the global default, or the automatic value.
                            None => self
                                .global
                                .args
                                .get(name)
                                .cloned()
                                .flatten()
                                .or_else(|| automatic.get(name).cloned().flatten()),
                        },
                    };
                    self.consumed.insert(name.clone());
                    scope.args.insert(name.clone(), value);
                    if !scope.arg_order.contains(name) {
                        scope.arg_order.push(name.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// What `ins` adds to the image's history, in BuildKit's words (`changes` are its config
    /// changes, `step` its step, `scope` the scope after it); `None` for FROM.
    fn history_line(
        &self,
        ins: &Instruction,
        changes: &[ConfigChange],
        step: Option<&PlannedStep>,
        scope: &Scope,
    ) -> Result<Option<HistoryLine>, DockerfileError> {
        let config = |created_by: String| {
            Ok(Some(HistoryLine {
                line: ins.line,
                created_by,
                layer: false,
            }))
        };
        let pairs = |prefix: &str| {
            let mut out = prefix.to_string();
            for c in changes {
                match c {
                    ConfigChange::Env { name, value } => out.push_str(&format!(" {name}={value}")),
                    ConfigChange::Label { key, value } => out.push_str(&format!(" {key}={value}")),
                    _ => {}
                }
            }
            out
        };
        let layer_of = |created_by: String| {
            Ok(step.map(|_| HistoryLine {
                line: ins.line,
                created_by,
                layer: true,
            }))
        };
        match &ins.kind {
            InstructionKind::From { .. } => Ok(None),
            InstructionKind::Arg { args } => config(format!(
                "ARG {}",
                args.iter()
                    .map(|(name, _)| match scope.args.get(name).cloned().flatten() {
                        Some(v) => format!("{name}={v}"),
                        None => name.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            InstructionKind::Env { .. } => config(pairs("ENV")),
            InstructionKind::Label { .. } => config(pairs("LABEL")),
            InstructionKind::Run { .. } => {
                let Some(StepDef::Run(r)) = step.map(|s| &s.def) else {
                    return Ok(None);
                };
                let mut words: Vec<String> = scope
                    .arg_order
                    .iter()
                    .map(|name| {
                        let v = scope
                            .env
                            .get(name)
                            .cloned()
                            .or_else(|| scope.args.get(name).cloned().flatten())
                            .unwrap_or_default();
                        format!("{name}={v}")
                    })
                    .collect();
                if !words.is_empty() {
                    words.insert(0, format!("|{}", words.len()));
                }
                words.extend(r.argv.iter().cloned());
                layer_of(format!("RUN {} # buildkit", words.join(" ")))
            }
            InstructionKind::Copy { dest, .. } | InstructionKind::Add { dest, .. } => {
                let Some(StepDef::Copy(c)) = step.map(|s| &s.def) else {
                    return Ok(None);
                };
                let mut out = String::from(if c.add { "ADD" } else { "COPY" });
                if c.parents {
                    out.push_str(" --parents");
                }
                if !c.chown.is_empty() {
                    out.push_str(&format!(" --chown={}", c.chown));
                }
                if !c.chmod.is_empty() {
                    out.push_str(&format!(" --chmod={}", c.chmod));
                }
                for src in &c.sources {
                    out.push_str(&format!(" {src}"));
                }
                for h in &c.inline {
                    out.push_str(&format!(" <<{}", h.name));
                }
                out.push_str(&format!(" {} # buildkit", self.expand(ins, dest, scope)?));
                layer_of(out)
            }
            InstructionKind::Workdir { .. } => match step.map(|s| &s.def) {
                Some(StepDef::Workdir { path, .. }) => layer_of(format!("WORKDIR {path}")),
                _ => config(format!("WORKDIR {}", scope.workdir)),
            },
            _ => {
                let text = match changes.first() {
                    Some(ConfigChange::Cmd { args }) => format!("CMD {}", go_quoted_list(args)),
                    Some(ConfigChange::Entrypoint { args }) => format!("ENTRYPOINT {}", go_quoted_list(args)),
                    Some(ConfigChange::User { user }) => format!("USER {user}"),
                    Some(ConfigChange::Stopsignal { signal }) => format!("STOPSIGNAL {signal}"),
                    Some(ConfigChange::Shell { args }) => format!("SHELL [{}]", args.join(" ")),
                    Some(ConfigChange::Onbuild { instruction }) => format!("ONBUILD {instruction}"),
                    _ if matches!(ins.kind, InstructionKind::Expose { .. }) => {
                        let mut ports: Vec<String> = changes
                            .iter()
                            .flat_map(|c| match c {
                                ConfigChange::Expose { ports } => ports.clone(),
                                _ => Vec::new(),
                            })
                            .collect();
                        ports.sort();
                        ports.dedup();
                        format!(
                            "EXPOSE map[{}]",
                            ports.iter().map(|p| format!("{p}:{{}}")).collect::<Vec<_>>().join(" ")
                        )
                    }
                    _ if matches!(ins.kind, InstructionKind::Volume { .. }) => {
                        let paths: Vec<String> = changes
                            .iter()
                            .flat_map(|c| match c {
                                ConfigChange::Volume { paths } => paths.clone(),
                                _ => Vec::new(),
                            })
                            .collect();
                        format!("VOLUME [{}]", paths.join(" "))
                    }
                    // HEALTHCHECK (Go's %+v of a struct) and MAINTAINER: as written.
                    _ => ins.written.clone(),
                };
                config(text)
            }
        }
    }

    fn resolve_stage_ref(
        &self,
        ins: &Instruction,
        r: &str,
        stages: &[PlannedStage],
        current: Option<&str>,
    ) -> Result<CopyFrom, DockerfileError> {
        let lower = r.to_ascii_lowercase();
        if let Ok(n) = r.parse::<usize>() {
            if n < stages.len() {
                return Ok(CopyFrom::Stage { index: n });
            }
            let hint = if n == stages.len() {
                "a stage cannot copy from itself".to_string()
            } else {
                format!(
                    "there are {} stages before this one (0 to {})",
                    stages.len(),
                    stages.len().saturating_sub(1)
                )
            };
            return Err(self.err(ins, format!("--from={n} names no earlier stage"), &hint));
        }
        if current == Some(lower.as_str()) {
            return Err(self.err(
                ins,
                format!("stage '{lower}' copies from itself"),
                "copy from an earlier stage or an image",
            ));
        }
        if let Some(s) = stages.iter().find(|s| s.name.as_deref() == Some(lower.as_str())) {
            return Ok(CopyFrom::Stage { index: s.index });
        }
        // A later stage by that name would form a forward reference: BuildKit resolves
        // names to stages anywhere in the file, so we do too and let the cycle check judge.
        if let Some(later) = self.stage_index_by_name(&lower) {
            return Ok(CopyFrom::Stage { index: later });
        }
        Ok(CopyFrom::Image {
            reference: r.to_string(),
        })
    }

    fn stage_index_by_name(&self, name: &str) -> Option<usize> {
        self.df
            .instructions
            .iter()
            .filter_map(|i| match &i.kind {
                InstructionKind::From { name, .. } => Some(name.as_deref()),
                _ => None,
            })
            .position(|n| n == Some(name))
    }

    /// The image-config changes an instruction makes, substituted with the scope before it.
    fn config_changes(&self, ins: &Instruction, scope: &Scope) -> Result<Vec<ConfigChange>, DockerfileError> {
        let x = |v: &str| self.expand(ins, v, scope);
        let wrap = |c: &Command| match c {
            Command::Exec { args } => args.clone(),
            Command::Shell { text } => scope.shell.iter().cloned().chain([text.clone()]).collect(),
        };
        Ok(match &ins.kind {
            InstructionKind::Env { pairs } => pairs
                .iter()
                .map(|(k, v)| {
                    Ok(ConfigChange::Env {
                        name: k.clone(),
                        value: x(v)?,
                    })
                })
                .collect::<Result<_, DockerfileError>>()?,
            InstructionKind::Cmd { command } => vec![ConfigChange::Cmd { args: wrap(command) }],
            InstructionKind::Entrypoint { command } => vec![ConfigChange::Entrypoint { args: wrap(command) }],
            InstructionKind::Workdir { path } => vec![ConfigChange::Workdir {
                path: join_path(&scope.workdir, &x(path)?),
            }],
            InstructionKind::User { user } => vec![ConfigChange::User { user: x(user)? }],
            InstructionKind::Expose { ports } => {
                let ports = ports
                    .iter()
                    .map(|p| {
                        x(p).map(|p| {
                            if p.contains('/') {
                                p.to_ascii_lowercase()
                            } else {
                                format!("{p}/tcp")
                            }
                        })
                    })
                    .collect::<Result<_, _>>()?;
                vec![ConfigChange::Expose { ports }]
            }
            InstructionKind::Label { pairs } => pairs
                .iter()
                .map(|(k, v)| {
                    Ok(ConfigChange::Label {
                        key: x(k)?,
                        value: x(v)?,
                    })
                })
                .collect::<Result<_, DockerfileError>>()?,
            InstructionKind::Maintainer { name } => vec![ConfigChange::Label {
                key: "maintainer".into(),
                value: name.clone(),
            }],
            InstructionKind::Volume { paths } => vec![ConfigChange::Volume {
                paths: paths.iter().map(|p| x(p)).collect::<Result<_, _>>()?,
            }],
            InstructionKind::Stopsignal { signal } => vec![ConfigChange::Stopsignal { signal: x(signal)? }],
            InstructionKind::Healthcheck { command } => {
                let test = match command {
                    None => vec!["NONE".to_string()],
                    Some(Command::Exec { args }) => {
                        ["CMD".to_string()].into_iter().chain(args.iter().cloned()).collect()
                    }
                    Some(Command::Shell { text }) => vec!["CMD-SHELL".to_string(), text.clone()],
                };
                let options: Vec<(String, String)> = ins
                    .flags
                    .iter()
                    .map(|f| (f.name.clone(), f.value.clone().unwrap_or_default()))
                    .collect();
                // Checked here so a bad value is a file:line error, not a broken image config.
                crate::healthcheck::parse_options(&options).map_err(|e| {
                    self.err(
                        ins,
                        e.to_string(),
                        "durations are Go durations (30s, 1m30s, 500ms); --retries is a whole number",
                    )
                })?;
                vec![ConfigChange::Healthcheck { test, options }]
            }
            InstructionKind::Shell { args } => vec![ConfigChange::Shell { args: args.clone() }],
            InstructionKind::Onbuild { instruction } => vec![ConfigChange::Onbuild {
                instruction: instruction.written.clone(),
            }],
            _ => Vec::new(),
        })
    }

    fn step(
        &mut self,
        ins: &Instruction,
        scope: &mut Scope,
        stages: &[PlannedStage],
        current: Option<&str>,
        deps: &mut BTreeSet<usize>,
        automatic: &BTreeMap<String, Option<String>>,
    ) -> Result<Option<PlannedStep>, DockerfileError> {
        let step = |def| {
            Some(PlannedStep {
                line: ins.line,
                end_line: ins.end_line,
                instruction: ins.written.clone(),
                def,
            })
        };
        match &ins.kind {
            InstructionKind::Arg { .. } => {
                self.declare_args(ins, Some((scope, automatic)))?;
                Ok(None)
            }
            InstructionKind::Env { pairs } => {
                let before = scope.clone();
                for (k, v) in pairs {
                    let v = self.expand(ins, v, &before)?;
                    scope.env.insert(k.clone(), v);
                }
                Ok(None)
            }
            InstructionKind::User { user } => {
                scope.user = self.expand(ins, user, scope)?;
                Ok(None)
            }
            InstructionKind::Shell { args } => {
                scope.shell = args.clone();
                Ok(None)
            }
            InstructionKind::Workdir { path } => {
                let p = self.expand(ins, path, scope)?;
                scope.workdir = join_path(&scope.workdir, &p);
                Ok(step(StepDef::Workdir {
                    path: scope.workdir.clone(),
                    user: scope.user.clone(),
                }))
            }
            InstructionKind::Run { command } => {
                let argv = match command {
                    Command::Exec { args } => args.clone(),
                    Command::Shell { text } => scope.shell.iter().cloned().chain([text.clone()]).collect(),
                };
                let mut mounts = Vec::new();
                let mut binds = Vec::new();
                for m in ins.flag_values("mount") {
                    let m = self.expand(ins, m, scope)?;
                    let parsed = run_mount::parse(&m).map_err(|e| {
                        self.err(
                            ins,
                            format!("RUN --mount={m}: {e}"),
                            "see https://docs.docker.com/reference/dockerfile/#run---mount",
                        )
                    })?;
                    let mut from_ref = None;
                    if let Some(from) = m.split(',').find_map(|kv| kv.strip_prefix("from=")) {
                        let r = self.resolve_stage_ref(ins, from, stages, current)?;
                        if let CopyFrom::Stage { index } = r {
                            deps.insert(index);
                        }
                        from_ref = Some(r);
                    }
                    if let RunMount::Bind {
                        target,
                        source,
                        readwrite,
                        ..
                    } = parsed
                    {
                        let source = source.trim_start_matches('/');
                        let target = run_mount::absolute_target(&target, &scope.workdir).map_err(|e| {
                            self.err(
                                ins,
                                format!("RUN --mount={m}: {e}"),
                                "give the mount a target=PATH below /",
                            )
                        })?;
                        binds.push(BindDef {
                            target,
                            source: if source.is_empty() {
                                ".".into()
                            } else {
                                source.to_string()
                            },
                            from: from_ref.unwrap_or(CopyFrom::Context),
                            readwrite,
                        });
                    }
                    mounts.push(m);
                }
                let network = ins.flag("network").unwrap_or("default").to_string();
                if !matches!(network.as_str(), "default" | "none" | "host") {
                    return Err(self.err(
                        ins,
                        format!("unknown RUN --network={network}"),
                        "use default, none or host",
                    ));
                }
                let mut env: BTreeMap<String, String> = scope
                    .args
                    .iter()
                    .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
                    .collect();
                env.extend(scope.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                Ok(step(StepDef::Run(RunDef {
                    argv,
                    heredocs: ins
                        .heredocs
                        .iter()
                        .map(|h| InlineFile {
                            name: h.delimiter.clone(),
                            content: h.body.clone(),
                            expand: h.expand,
                        })
                        .collect(),
                    env: env.into_iter().collect(),
                    workdir: scope.workdir.clone(),
                    user: scope.user.clone(),
                    mounts,
                    network,
                    security: ins.flag("security").unwrap_or("sandbox").to_string(),
                    binds,
                })))
            }
            InstructionKind::Copy { sources, dest } | InstructionKind::Add { sources, dest } => {
                let add = matches!(ins.kind, InstructionKind::Add { .. });
                let from = match ins.flag("from") {
                    Some(f) if !add => {
                        let f = self.expand(ins, f, scope)?;
                        let from = self.resolve_stage_ref(ins, &f, stages, current)?;
                        match &from {
                            CopyFrom::Stage { index } => {
                                deps.insert(*index);
                            }
                            CopyFrom::Image { reference } if !reference.contains([':', '/', '@', '.']) => {
                                // BuildKit treats it as an image; a typo'd stage name is likelier.
                                self.warnings.push(format!(
                                    "{}:{}: --from={reference} names no stage of this Dockerfile, so it is taken as an image",
                                    self.df.file, ins.line
                                ));
                            }
                            CopyFrom::Image { .. } | CopyFrom::Context => {}
                        }
                        from
                    }
                    _ => CopyFrom::Context,
                };
                let mut heredocs = ins.heredocs.iter();
                let mut paths = Vec::new();
                let mut inline = Vec::new();
                for s in sources {
                    if s.starts_with("<<") {
                        if let Some(h) = heredocs.next() {
                            let content = if h.expand {
                                self.expand(ins, &h.body, scope)?
                            } else {
                                h.body.clone()
                            };
                            inline.push(InlineFile {
                                name: h.delimiter.clone(),
                                content,
                                expand: h.expand,
                            });
                            continue;
                        }
                    }
                    paths.push(self.expand(ins, s, scope)?);
                }
                let dest = self.expand(ins, dest, scope)?;
                let mut resolved = join_path(&scope.workdir, &dest);
                // A trailing `\` is a directory too: Windows paths (`C:\app\`), with `escape=`\``.
                if (dest.ends_with('/') || dest.ends_with('\\') || dest == ".") && !resolved.ends_with('/') {
                    resolved.push('/');
                }
                // As BuildKit: only file sources count; heredoc files go into the destination.
                if paths.len() > 1 && !resolved.ends_with('/') {
                    return Err(self.err(
                        ins,
                        format!(
                            "{} with several sources needs a directory destination",
                            if add { "ADD" } else { "COPY" }
                        ),
                        &format!("end the destination with a slash: {dest}/"),
                    ));
                }
                let excludes = ins
                    .flag_values("exclude")
                    .into_iter()
                    .map(|e| self.expand(ins, e, scope))
                    .collect::<Result<_, _>>()?;
                let flag = |name: &str| -> Result<String, DockerfileError> {
                    ins.flag(name)
                        .map(|v| self.expand(ins, v, scope))
                        .transpose()
                        .map(Option::unwrap_or_default)
                };
                let boolean = |name: &str| ins.flag(name).is_some_and(|v| v.is_empty() || v == "true");
                Ok(step(StepDef::Copy(CopyDef {
                    add,
                    from,
                    sources: paths,
                    inline,
                    dest: resolved,
                    chown: flag("chown")?,
                    chmod: flag("chmod")?,
                    link: boolean("link"),
                    excludes,
                    parents: boolean("parents"),
                    checksum: flag("checksum")?,
                    keep_git_dir: boolean("keep-git-dir"),
                })))
            }
            InstructionKind::Label { pairs } => {
                for (_, v) in pairs {
                    self.expand(ins, v, scope)?;
                }
                Ok(None)
            }
            InstructionKind::Expose { ports } | InstructionKind::Volume { paths: ports } => {
                for v in ports {
                    self.expand(ins, v, scope)?;
                }
                Ok(None)
            }
            InstructionKind::Stopsignal { signal } => {
                self.expand(ins, signal, scope)?;
                Ok(None)
            }
            InstructionKind::From { .. }
            | InstructionKind::Cmd { .. }
            | InstructionKind::Entrypoint { .. }
            | InstructionKind::Maintainer { .. }
            | InstructionKind::Healthcheck { .. }
            | InstructionKind::Onbuild { .. } => Ok(None),
        }
    }
}

/// Resolves `p` against directory `base` the way WORKDIR and COPY destinations do.
fn join_path(base: &str, p: &str) -> String {
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{}/{}", base.trim_end_matches('/'), p)
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(text: &str, args: &[(&str, &str)], target: Option<&str>) -> Result<BuildPlan, DockerfileError> {
        plan_with(text, args, target, &NoBaseImages)
    }

    fn plan_with(
        text: &str,
        args: &[(&str, &str)],
        target: Option<&str>,
        bases: &dyn BaseImages,
    ) -> Result<BuildPlan, DockerfileError> {
        let df = Dockerfile::parse("Dockerfile", text)?;
        let build_args = args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        plan(
            &df,
            &PlanRequest {
                build_args: &build_args,
                target,
                platform: Platform::parse("linux/amd64").unwrap(),
                bases,
            },
        )
    }

    /// A RUN's environment without the PATH every stage starts with.
    fn env_of(r: &RunDef) -> Vec<(String, String)> {
        r.env.iter().filter(|(k, _)| k != "PATH").cloned().collect()
    }

    /// One base image, `base`, with a config.
    struct OneBase(BaseConfig);

    impl BaseImages for OneBase {
        fn config(&self, reference: &str) -> Option<BaseConfig> {
            (reference == "base").then(|| self.0.clone())
        }
    }

    #[test]
    fn a_base_image_config_is_in_effect_from_the_start() {
        let base = OneBase(BaseConfig {
            env: vec!["PATH=/usr/bin:/bin".into(), "HOME=/home/app".into()],
            user: "app".into(),
            workdir: "/srv".into(),
            shell: vec!["/bin/bash".into(), "-ec".into()],
            onbuild: vec!["RUN echo triggered".into(), "ENV FROM_TRIGGER=1".into()],
        });
        let p = plan_with(
            "FROM base\nENV PATH=/opt/bin:$PATH\nWORKDIR app\nRUN echo $HOME\nCOPY f $HOME/\n",
            &[],
            None,
            &base,
        )
        .unwrap();
        let trigger = run(&p, 0, 0);
        assert_eq!(
            trigger.argv,
            ["/bin/bash", "-ec", "echo triggered"],
            "ONBUILD runs first, in the base's SHELL"
        );
        assert_eq!(p.stages[0].steps[0].line, 1, "a trigger stands at its FROM");
        assert_eq!((trigger.workdir.as_str(), trigger.user.as_str()), ("/srv", "app"));
        let r = run(&p, 0, 2);
        assert_eq!(r.workdir, "/srv/app", "a relative WORKDIR resolves against the base's");
        let env: BTreeMap<String, String> = r.env.iter().cloned().collect();
        assert_eq!(env["PATH"], "/opt/bin:/usr/bin:/bin", "$PATH is the base's");
        assert_eq!(env["FROM_TRIGGER"], "1");
        let StepDef::Copy(c) = &p.stages[0].steps[3].def else {
            panic!("COPY expected");
        };
        assert_eq!(c.dest, "/home/app/");
        assert!(
            p.stages[0]
                .config
                .iter()
                .any(|c| matches!(c, ConfigChange::Env { name, .. } if name == "FROM_TRIGGER")),
            "a trigger's config change is the stage's"
        );
    }

    #[test]
    fn directory_destinations_as_buildkit_reads_them() {
        // Several heredoc files need no slash: only file sources count, as in BuildKit.
        assert!(plan_of("FROM a\nCOPY <<A <<B /bar\na\nA\nb\nB\n", &[], None).is_ok());
        assert!(plan_of("FROM a\nCOPY x y /bar\n", &[], None).is_err());
        // A Windows path's trailing backslash is a directory (with escape=`).
        assert!(plan_of("# escape=`\nFROM a\nCOPY x y C:\\app\\\n", &[], None).is_ok());
    }

    #[test]
    fn a_from_that_expands_to_an_invalid_reference_is_refused_at_its_line() {
        let e = plan_of("ARG GO\nFROM golang:$GO\nRUN x\n", &[], None).unwrap_err();
        assert_eq!(e.location.line, 2);
        assert!(e.message.contains("'golang:'") && e.hint.contains("--build-arg"), "{e}");
        assert!(plan_of("ARG GO\nFROM golang:$GO\nRUN x\n", &[("GO", "1.22")], None).is_ok());
        assert!(
            plan_of("FROM Ubuntu\nRUN x\n", &[], None).is_err(),
            "upper case, as Docker refuses"
        );
        assert!(
            plan_of("FROM a AS Build\nFROM build\nRUN x\n", &[], None).is_ok(),
            "stage names are not references"
        );
    }

    #[test]
    fn a_base_without_path_gets_buildkits_and_bad_triggers_are_refused() {
        let p = plan_of("FROM scratch\nRUN x\n", &[], None).unwrap();
        assert_eq!(run(&p, 0, 0).env, [("PATH".to_string(), DEFAULT_PATH.to_string())]);
        let base = OneBase(BaseConfig {
            onbuild: vec!["FROM other".into()],
            ..BaseConfig::default()
        });
        let e = plan_with("FROM base\nRUN x\n", &[], None, &base).unwrap_err();
        assert_eq!(e.location.line, 1);
        assert!(e.message.contains("ONBUILD trigger"), "{e}");
    }

    fn run(p: &BuildPlan, stage: usize, step: usize) -> RunDef {
        match &p.stages[stage].steps[step].def {
            StepDef::Run(r) => r.clone(),
            other => panic!("not a RUN: {other:?}"),
        }
    }

    #[test]
    fn global_arg_feeds_from_and_a_redeclared_arg_inherits_its_default() {
        let p = plan_of("ARG V=3.19\nFROM alpine:$V\nARG V\nRUN echo\n", &[], None).unwrap();
        assert_eq!(
            p.stages[0].base,
            Base::Image {
                reference: "alpine:3.19".into()
            }
        );
        assert_eq!(env_of(&run(&p, 0, 0)), [("V".to_string(), "3.19".to_string())]);
    }

    #[test]
    fn global_arg_is_not_visible_in_a_stage_without_redeclaration() {
        let p = plan_of("ARG V=1\nFROM a\nRUN echo\n", &[], None).unwrap();
        assert!(env_of(&run(&p, 0, 0)).is_empty());
    }

    #[test]
    fn env_overrides_arg_and_shell_form_is_wrapped() {
        let p = plan_of(
            "FROM a\nARG X=arg\nENV X=env Y=$X\nSHELL [\"/bin/bash\", \"-c\"]\nWORKDIR app\nUSER nobody\nRUN echo $X\n",
            &[("X", "cli")],
            None,
        )
        .unwrap();
        let r = run(&p, 0, 1);
        assert_eq!(r.argv, ["/bin/bash", "-c", "echo $X"]);
        assert_eq!(
            env_of(&r),
            [
                ("X".to_string(), "env".to_string()),
                ("Y".to_string(), "cli".to_string())
            ]
        );
        assert_eq!((r.workdir.as_str(), r.user.as_str()), ("/app", "nobody"));
    }

    #[test]
    fn stages_inherit_env_but_not_args() {
        let p = plan_of("FROM a AS one\nARG A=1\nENV E=2\nFROM one\nRUN x\n", &[], None).unwrap();
        assert_eq!(p.stages[1].base, Base::Stage { index: 0 });
        assert_eq!(env_of(&run(&p, 1, 0)), [("E".to_string(), "2".to_string())]);
    }

    #[test]
    fn target_prunes_stages_it_does_not_need() {
        let p = plan_of(
            "FROM a AS dep\nRUN d\nFROM a AS other\nRUN o\nFROM a AS app\nCOPY --from=dep /x /x\n",
            &[],
            Some("app"),
        )
        .unwrap();
        let needed: Vec<bool> = p.stages.iter().map(|s| s.needed).collect();
        assert_eq!(needed, [true, false, true]);
        let e = plan_of("FROM a AS x\n", &[], Some("nope")).unwrap_err();
        assert!(e.hint.contains("x"), "{e}");
    }

    #[test]
    fn copy_from_forward_stage_cycle_is_reported() {
        let e = plan_of(
            "FROM a AS one\nCOPY --from=two /a /a\nFROM a AS two\nCOPY --from=one /b /b\n",
            &[],
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("cycle"), "{e}");
        assert!(plan_of("FROM a AS one\nCOPY --from=one /a /a\n", &[], None).is_err());
    }

    #[test]
    fn copy_dest_resolves_against_workdir_and_from_index_or_image() {
        let p = plan_of(
            "FROM a\nRUN b\nFROM a\nWORKDIR /srv\nCOPY --from=0 x ./\nCOPY --from=busybox:1 /bin/sh sh\n",
            &[],
            None,
        )
        .unwrap();
        let StepDef::Copy(c) = &p.stages[1].steps[1].def else {
            panic!()
        };
        assert_eq!((c.dest.as_str(), &c.from), ("/srv/", &CopyFrom::Stage { index: 0 }));
        let StepDef::Copy(c) = &p.stages[1].steps[2].def else {
            panic!()
        };
        assert_eq!(
            (c.dest.as_str(), &c.from),
            (
                "/srv/sh",
                &CopyFrom::Image {
                    reference: "busybox:1".into()
                }
            )
        );
    }

    #[test]
    fn a_bare_from_name_that_is_no_stage_is_an_image_with_a_warning() {
        let p = plan_of("FROM a AS builder\nFROM b\nCOPY --from=buildr /x /x\n", &[], None).unwrap();
        assert!(
            p.warnings[0].contains("--from=buildr names no stage"),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn undeclared_build_arg_is_reported_and_changes_nothing() {
        let p = plan_of("FROM a\nRUN x\n", &[("NOPE", "1")], None).unwrap();
        assert!(p.warnings[0].contains("NOPE"));
        assert!(env_of(&run(&p, 0, 0)).is_empty());
    }

    #[test]
    fn history_reads_as_buildkit_writes_it() {
        let p = plan_of(
            "FROM a\nARG V=1\nENV P=/srv Q=$V\nWORKDIR $P\nCOPY --chmod=644 x y/ ./\nRUN echo \"$P\"\nEXPOSE 53/udp 80\nCMD run \"it\"\nARG W\n",
            &[],
            None,
        )
        .unwrap();
        let h: Vec<(usize, &str, bool)> = p.stages[0]
            .history
            .iter()
            .map(|h| (h.line, h.created_by.as_str(), h.layer))
            .collect();
        assert_eq!(
            h,
            [
                (2, "ARG V=1", false),
                (3, "ENV P=/srv Q=1", false),
                (4, "WORKDIR /srv", true),
                (5, "COPY --chmod=644 x y/ ./ # buildkit", true),
                (6, "RUN |1 V=1 /bin/sh -c echo \"$P\" # buildkit", true),
                (7, "EXPOSE map[53/udp:{} 80/tcp:{}]", false),
                (8, "CMD [\"/bin/sh\" \"-c\" \"run \\\"it\\\"\"]", false),
                (9, "ARG W", false),
            ]
        );
        assert_eq!(
            p.stages[0].history.iter().filter(|h| h.layer).count(),
            p.stages[0].steps.len(),
            "one layer entry per step"
        );
    }

    #[test]
    fn config_changes_are_recorded_substituted_and_wrapped() {
        let p = plan_of(
            "FROM a\nENV P=/srv\nWORKDIR $P\nEXPOSE 80 53/UDP\nLABEL v=\"1 2\"\nCMD run $P\n",
            &[],
            None,
        )
        .unwrap();
        let c = &p.stages[0].config;
        assert!(c.contains(&ConfigChange::Workdir { path: "/srv".into() }));
        assert!(c.contains(&ConfigChange::Expose {
            ports: vec!["80/tcp".into(), "53/udp".into()]
        }));
        assert!(c.contains(&ConfigChange::Label {
            key: "v".into(),
            value: "1 2".into()
        }));
        assert!(c.contains(&ConfigChange::Cmd {
            args: vec!["/bin/sh".into(), "-c".into(), "run $P".into()]
        }));
    }

    #[test]
    fn join_path_normalises() {
        assert_eq!(join_path("/a/b", "../c/./d"), "/a/c/d");
        assert_eq!(join_path("/a", "/x"), "/x");
        assert_eq!(join_path("/", "."), "/");
    }
}
