//! The `lcache` command line (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use lcache_proto::endpoint::Endpoint;

/// lcache: a build cache for Dockerfile builds that says why each step rebuilt.
#[derive(Debug, Parser)]
#[command(name = "lcache", version, about)]
pub struct Cli {
    /// Which daemon, and the token to show it.
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Which lcached a command talks to.
#[derive(Debug, Clone, Default, Args)]
pub struct DaemonArgs {
    /// The daemon to use: unix:///path/to.sock, tcp://host:port or https://host:port
    /// [default: the local lcached's socket].
    #[arg(long, global = true, env = "LCACHE_DAEMON", value_name = "ADDR")]
    pub daemon: Option<Endpoint>,
    /// A file holding the token for a daemon's TCP listener (`lcache token create`);
    /// `LCACHE_TOKEN` gives the token itself. The Unix socket needs none.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// For an https:// daemon: the CA certificate (PEM) that signed its certificate
    /// [default: the system's CAs].
    #[arg(long, global = true, env = "LCACHE_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the parsed Dockerfile (instructions, lines, flags) as text or JSON.
    Parse(ParseArgs),
    /// Print every step's cache key and the inputs it is made of (through the daemon when
    /// one runs, else offline).
    Keys(KeysArgs),
    /// Predict which steps a build would take from the cache and which it would run.
    Plan(KeysArgs),
    /// Build an image: cached steps are reused, the others run for real (needs root, runc).
    Build(Box<BuildArgs>),
    /// Why each step of a build rebuilt, and what each root cause cost.
    Explain(ExplainArgs),
    /// Past builds: when, hit rate, time saved, root causes.
    History(HistoryArgs),
    /// Manage the images lcached knows (bases for FROM, results of -t).
    Image {
        /// What to do.
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Show the daemon's state: store, listeners, cache contents, indexed contexts.
    Status(JsonArg),
    /// Make, list and revoke tokens for the daemon's TCP listeners.
    Token {
        /// What to do.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Inspect the cache.
    Cache {
        /// What to inspect.
        #[command(subcommand)]
        command: CacheCommand,
    },
}

/// `lcache explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The build id (see `lcache history`) [default: the last build].
    pub build: Option<String>,
    /// Show one step (its number, as in the build's output) with its full key-input diff.
    #[arg(long)]
    pub step: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `lcache history`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HistoryArgs {
    /// `show BUILD`.
    #[command(subcommand)]
    pub command: Option<HistoryCommand>,
    /// How many builds to list.
    #[arg(short = 'n', default_value_t = 10)]
    pub n: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `lcache history show`.
#[derive(Debug, Subcommand)]
pub enum HistoryCommand {
    /// One build, step by step, with causes.
    Show {
        /// The build id.
        build: String,
    },
}

/// `lcache image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a `docker save` tar, an OCI image layout (directory or tar) or a rootfs tar.
    Import {
        /// The file or directory.
        file: PathBuf,
        /// The name to give it (default: the name the file carries).
        name: Option<String>,
    },
    /// Pull an image from a registry (Docker's credentials are used; loopback registries
    /// may be plain HTTP).
    Pull {
        /// `[REGISTRY/]NAME[:TAG|@DIGEST]` (`debian` is `docker.io/library/debian:latest`).
        reference: String,
        /// The platform to pick from a multi-platform image [default: this machine's].
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        /// A registry (`host:port`) to reach over plain HTTP; may be given more than once.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registries: Vec<String>,
    },
    /// Push an image to a registry, as NAME or as REFERENCE.
    Push {
        /// The image's name here.
        name: String,
        /// Where it goes [default: NAME].
        reference: Option<String>,
        /// A registry (`host:port`) to reach over plain HTTP; may be given more than once.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registries: Vec<String>,
    },
    /// An image's layers, newest first, as `docker history` shows them, with the
    /// Dockerfile line, the step's key and whether its build took it from the cache.
    History {
        /// The image's name.
        name: String,
        /// Show whole instructions, ids and keys.
        #[arg(long)]
        no_trunc: bool,
        /// `table` (default) or `json` (one object per line, as `docker history --format json`).
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// An image as `docker inspect` shows it (Id, RepoTags, Config, RootFS, Size…).
    Inspect {
        /// The image's name.
        name: String,
    },
    /// What each layer adds, modifies and removes, the bytes wasted on files a later layer
    /// overwrites or removes (Dive's efficiency), the Dockerfile lines that caused them and
    /// the fix; `--ci` applies Dive's rules and fails the command when one fails.
    Analyze {
        /// The image's name.
        name: String,
        /// Print the analysis as JSON.
        #[arg(long)]
        json: bool,
        /// Check Dive's rules (lowestEfficiency, highestWastedBytes, highestUserWastedPercent)
        /// and exit non-zero when one fails.
        #[arg(long)]
        ci: bool,
        /// The rules file [default: .dive-ci in the current directory, else Dive's defaults].
        #[arg(long, value_name = "FILE", requires = "ci")]
        ci_config: Option<PathBuf>,
    },
    /// List images.
    Ls(JsonArg),
    /// Forget an image name (its layers stay cached).
    Rm {
        /// The image name.
        name: String,
    },
}

/// `lcache build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Build inputs.
    #[command(flatten)]
    pub inputs: BuildInputs,
    /// Name the result (repeatable); it can then be used in FROM and exported.
    #[arg(short = 't', long = "tag", value_name = "NAME:TAG")]
    pub tags: Vec<String>,
    /// Run every step even if the cache has it (new results are still stored).
    #[arg(long)]
    pub no_cache: bool,
    /// Pull every base image again, re-resolving its tag (otherwise only missing ones are
    /// pulled).
    #[arg(long)]
    pub pull: bool,
    /// Merge the target stage's own layers into one on top of its base (config and
    /// history kept); the steps stay cached, the squashed layer is no step's.
    #[arg(long)]
    pub squash: bool,
    /// Push the image to each -t reference after it is built.
    #[arg(long, requires = "tags")]
    pub push: bool,
    /// When the build ends: `now`, once its image is named (its manifest digest printed);
    /// `later`, once every step has run and is cached, leaving lcached to name and tag the
    /// image when it is still taking a re-run COPY's diff_id (the build id is printed;
    /// `lcache history`, `images`, `push` wait for it). `auto`: `later` when stdout is a
    /// terminal and nothing else asks for the image (--output, --push, --squash,
    /// --summary-json), else `now`.
    #[arg(long, value_enum, default_value_t = NameImage::Auto, value_name = "WHEN")]
    pub name_image: NameImage,
    /// A registry (`host:port`) to reach over plain HTTP; may be given more than once.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Export the image: type=oci|docker|local,dest=PATH; compression=uncompressed keeps
    /// layers kept as their tar as they are, compression=zstd (type=oci) writes them as zstd
    /// (by default they are gzipped, as BuildKit does).
    #[arg(long, value_name = "type=…,dest=…[,compression=…]")]
    pub output: Option<String>,
    /// How to show progress: auto (tty on a terminal, else plain), tty, plain, json.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tty", "plain", "json"])]
    pub progress: String,
    /// The OCI runtime to run RUN steps with.
    #[arg(long, default_value = "runc", value_name = "PATH")]
    pub runtime: String,
    /// Where extracted layers are kept [default: $LCACHE_CACHE_DIR, else ~/.cache/lcache or /var/cache/lcache].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A secret for `RUN --mount=type=secret,id=ID`: `id=ID,src=FILE` or `id=ID,env=VAR`;
    /// never in a key, a layer or the history. May be given more than once.
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    pub secrets: Vec<String>,
    /// An SSH agent for `RUN --mount=type=ssh`: `default` (the agent at $SSH_AUTH_SOCK), or
    /// `ID=SOCKET`; the RUN sees a forwarded socket, never a key. May be given more than once.
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET]")]
    pub ssh: Vec<String>,
    /// Write step records into this scope (a branch, say) and look them up there first
    /// [default: unscoped].
    #[arg(long, env = "LCACHE_SCOPE", value_name = "NAME")]
    pub scope: Option<String>,
    /// Where lookups go after --scope, in order (e.g. main); may be given more than once.
    #[arg(long = "scope-fallback", value_name = "NAME", requires = "scope")]
    pub scope_fallbacks: Vec<String>,
    /// Write a JSON summary for CI dashboards to FILE: hit rate, time saved, bytes
    /// fetched and stored, root causes.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// How the layers this build makes are kept: `none` (the tar itself, held by lcached
    /// as links to the build's own files: nothing compressed on the build path, the layer's
    /// digest is its diff_id; gzipped where it leaves the machine: `--push`, `--output`, a
    /// shared tier), or `gzip` (as registries take them). The image's ID is the same
    /// either way; its manifest digest is not.
    #[arg(
        long,
        value_enum,
        env = "LCACHE_LAYER_COMPRESSION",
        default_value_t = LayerCompressionArg::None,
        value_name = "HOW"
    )]
    pub layer_compression: LayerCompressionArg,
}

/// `--layer-compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayerCompressionArg {
    /// gzip layers, as registries and `docker load` take them.
    Gzip,
    /// Uncompressed layers, compressed where they leave the machine.
    None,
}

impl From<LayerCompressionArg> for lcache_proto::wire::LayerCompression {
    fn from(a: LayerCompressionArg) -> Self {
        match a {
            LayerCompressionArg::Gzip => Self::Gzip,
            LayerCompressionArg::None => Self::None,
        }
    }
}

/// `lcache cache …`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Cache contents and hit/miss counts.
    Stats(JsonArg),
    /// Wait until every step record stored here is pushed to the daemon's upstream; fail,
    /// naming them, if some could not be.
    Sync,
    /// Empty the `RUN --mount=type=cache` directories in the client cache that no RUN is
    /// using and remove its layer snapshots, least recently used first (lcached makes them
    /// again when a build needs one); with --upstream, prune a bucket instead.
    Prune {
        /// The client cache [default: as `lcache build` uses it].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Keep the most recently used snapshots up to this size (bytes, or 500M, 20G)
        /// [default: 0, remove them all].
        #[arg(long, value_name = "SIZE", conflicts_with = "upstream")]
        keep_storage: Option<String>,
        /// A bucket tier to prune (`s3://BUCKET/PREFIX`, with the AWS_* environment
        /// variables): records unused for --older-than go, then blobs as old that no kept
        /// record needs.
        #[arg(long, value_name = "s3://BUCKET/PREFIX", requires = "older_than")]
        upstream: Option<String>,
        /// With --upstream: the age (30d, 12h, 90m) past which what no build used goes.
        #[arg(long, value_name = "AGE", requires = "upstream")]
        older_than: Option<String>,
        /// With --upstream: count what would go, remove nothing.
        #[arg(long, requires = "upstream")]
        dry_run: bool,
    },
}

/// `lcache token …`: tokens for the daemon's TCP listeners (run on its machine, through
/// its socket).
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (the only time it is shown; lcached keeps its hash).
    Create {
        /// A name for it (`ci-runners`, `alice`); making a name again replaces its token.
        name: String,
        /// `read`: look up and download; `write`: also store.
        #[arg(long, value_parser = ["read", "write"], default_value = "read")]
        access: String,
        /// Limit a write token to step records in scopes matching this pattern (`pr-*`);
        /// it may then store records and blobs only (no images, no builds).
        #[arg(long, value_name = "PATTERN")]
        scope: Option<String>,
    },
    /// List the tokens (names and access, never the tokens).
    Ls(JsonArg),
    /// Revoke a token: it stops working at once.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// Just `--json`.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `lcache parse`.
#[derive(Debug, Args)]
pub struct ParseArgs {
    /// The Dockerfile to parse.
    #[arg(short = 'f', long = "file", default_value = "Dockerfile")]
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The inputs every build-like command takes.
#[derive(Debug, Args)]
pub struct BuildInputs {
    /// The Dockerfile [default: CONTEXT/Dockerfile].
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Set a build-time variable declared by ARG (`K=V`, or `K` to take it from the environment).
    #[arg(long = "build-arg", value_name = "K=V")]
    pub build_args: Vec<String>,
    /// Build up to this stage (by its AS name) instead of the last one.
    #[arg(long)]
    pub target: Option<String>,
    /// Platform to build for (os/arch[/variant]) [default: this machine's].
    #[arg(long)]
    pub platform: Option<String>,
    /// The build context directory.
    pub context: PathBuf,
}

/// `lcache keys` and `lcache plan`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Build inputs.
    #[command(flatten)]
    pub inputs: BuildInputs,
    /// Print JSON instead of text (every selected file listed).
    #[arg(long)]
    pub json: bool,
    /// Do not use a daemon: read and hash the context in this process.
    #[arg(long)]
    pub offline: bool,
}

/// When `lcache build` ends (`--name-image`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NameImage {
    /// `later` at a terminal when nothing else asks for the image, else `now`.
    Auto,
    /// Once the image is named.
    Now,
    /// Once every step has run and is cached.
    Later,
}
