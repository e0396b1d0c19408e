//! Extra RabbitMQ nodes for fault tests, started and stopped by the test:
//! each on its own ports, node name, Erlang cookie and data, log and
//! configuration directories under a temporary directory, so that the
//! shared default node (`rabbit@localhost`, port 5672) is never touched.
//!
//! Needs the RabbitMQ server installed (Debian's `rabbitmq-server`, as
//! `scripts/test-all` installs it); the nodes run as the current user.
//! [`Cluster`] stops its nodes when dropped, on a test failure too, and a
//! run first stops what an aborted earlier run of the same cluster left.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one node may take to start (Erlang on a busy 2-core machine
/// is slow to boot).
const START_SECS: u64 = 120;

/// One extra node.
#[derive(Debug)]
pub struct Node {
    /// `bus-<tag><n>@localhost`.
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Extra RabbitMQ nodes clustered together (a single node is a cluster of
/// one).
#[derive(Debug)]
pub struct Cluster {
    base: PathBuf,
    /// The nodes, in URL order.
    pub nodes: Vec<Node>,
}

/// `path` if it exists, else `name` from `PATH`.
fn tool(path: &str, name: &str) -> String {
    if Path::new(path).exists() {
        path.to_owned()
    } else {
        name.to_owned()
    }
}

fn server_bin() -> String {
    tool("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")
}

fn ctl_bin() -> String {
    // Debian's /usr/sbin wrappers switch to the `rabbitmq` user (and its
    // cookie); the scripts behind them run as the caller.
    tool("/usr/lib/rabbitmq/bin/rabbitmqctl", "rabbitmqctl")
}

impl Cluster {
    /// Starts `count` nodes named `bus-<tag>1@localhost`... with AMQP ports
    /// from `first_port` (distribution ports 20000 above) and clusters
    /// them. Panics (after stopping what it started) when a node does not
    /// come up in time.
    pub fn start(tag: &str, first_port: u16, count: u16) -> Cluster {
        Self::start_with(tag, first_port, count, "")
    }

    /// As [`Cluster::start`], with these lines added to every node's
    /// `rabbitmq.conf`.
    pub fn start_with(tag: &str, first_port: u16, count: u16, extra_conf: &str) -> Cluster {
        Self::start_with_plugins(tag, first_port, count, extra_conf, &[])
    }

    /// As [`Cluster::start_with`], with these plugins enabled on every node
    /// (`rabbitmq_consistent_hash_exchange`, ...).
    pub fn start_with_plugins(
        tag: &str,
        first_port: u16,
        count: u16,
        extra_conf: &str,
        plugins: &[&str],
    ) -> Cluster {
        let base = std::env::temp_dir().join(format!("bus-amqp-nodes-{tag}"));
        stop_stale(&base);
        fs::create_dir_all(base.join("home")).expect("create the nodes' directory");
        let cookie = base.join("home/.erlang.cookie");
        fs::write(
            &cookie,
            format!("BUSAMQPTEST{}", uuid::Uuid::new_v4().simple()),
        )
        .expect("write the Erlang cookie");
        set_mode(&cookie, 0o400);
        fs::write(
            base.join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )
        .expect("write enabled_plugins");
        // Read instead of /etc/rabbitmq/rabbitmq-env.conf, which names the
        // default node.
        fs::write(base.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        let names: Vec<String> = (1..=count)
            .map(|n| format!("bus-{tag}{n}@localhost"))
            .collect();
        let mut cluster = Cluster {
            base: base.clone(),
            nodes: Vec::new(),
        };
        for (i, name) in names.iter().enumerate() {
            let port = first_port + i as u16;
            let dir = base.join(format!("node{}", i + 1));
            fs::create_dir_all(&dir).expect("create a node directory");
            let mut conf = format!(
                "listeners.tcp.default = 127.0.0.1:{port}\n\
                 log.console = false\n\
                 log.file.level = warning\n\
                 {extra_conf}\n"
            );
            if count > 1 {
                conf.push_str("cluster_formation.peer_discovery_backend = classic_config\n");
                for (j, other) in names.iter().enumerate() {
                    conf.push_str(&format!(
                        "cluster_formation.classic_config.nodes.{} = {other}\n",
                        j + 1
                    ));
                }
            }
            fs::write(dir.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
            cluster.nodes.push(Node {
                name: name.clone(),
                port,
                dist_port: port + 20000,
                dir,
                child: None,
            });
        }
        // The first node alone, then the others, which join it.
        cluster.spawn(0);
        cluster.await_startup(0);
        for i in 1..cluster.nodes.len() {
            cluster.spawn(i);
        }
        for i in 1..cluster.nodes.len() {
            cluster.await_startup(i);
        }
        cluster.await_running(cluster.nodes.len());
        cluster
    }

    /// `amqp://guest:guest@` every node `/%2f`, in order.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("amqp://guest:guest@{}/%2f", hosts.join(","))
    }

    /// The URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// The index of the node listening on `host_port` (`127.0.0.1:5681`).
    pub fn index_of(&self, host_port: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| host_port.ends_with(&format!(":{}", n.port)))
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("HOME", self.base.join("home"))
            .env(
                "RABBITMQ_CONF_ENV_FILE",
                self.base.join("rabbitmq-env.conf"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.base.join("enabled_plugins"),
            )
            .env_remove("RABBITMQ_NODENAME")
            .env_remove("ERL_FLAGS");
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("console.log"))
            .expect("open the node's console log");
        let mut cmd = Command::new(server_bin());
        self.env(&mut cmd);
        cmd.env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            // The script then replaces itself with the Erlang VM, so the
            // child's pid is the node's and a kill reaches the node.
            .env("RUNNING_UNDER_SYSTEMD", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone a file handle"))
            .stderr(out);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): is rabbitmq-server installed? scripts/test-all installs it",
                server_bin()
            )
        });
        fs::write(node.dir.join("pid"), child.id().to_string()).expect("write the pid file");
        self.nodes[i].child = Some(child);
    }

    /// Runs `rabbitmqctl -n <node i> args` and returns its output, or the
    /// error output on failure.
    pub fn try_ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(ctl_bin());
        self.env(&mut cmd);
        let out = cmd
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", ctl_bin()))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// As [`Cluster::try_ctl`], failing the test on an error.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        self.try_ctl(i, args)
            .unwrap_or_else(|e| panic!("rabbitmqctl -n {} {args:?}: {e}", self.nodes[i].name))
    }

    fn log_tail(&self, i: usize) -> String {
        let mut text =
            fs::read_to_string(self.nodes[i].dir.join("console.log")).unwrap_or_default();
        if let Ok(entries) = fs::read_dir(self.nodes[i].dir.join("log")) {
            for e in entries.flatten() {
                text.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        let mut start = text.len().saturating_sub(3000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    }

    /// Waits until node `i` runs RabbitMQ, or fails the test.
    fn await_startup(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(START_SECS);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = &mut self.nodes[i].child {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "node {} exited while starting ({status}):\n{}",
                        self.nodes[i].name,
                        self.log_tail(i)
                    );
                }
            }
            // Fails at once until the node has registered with epmd.
            match self.try_ctl(i, &["await_startup", "--timeout", "60"]) {
                Ok(_) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "node {} did not start within {START_SECS}s: {last}\n{}",
            self.nodes[i].name,
            self.log_tail(i)
        );
    }

    /// Waits until the first live node sees `n` running nodes.
    fn await_running(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            let live = (0..self.nodes.len())
                .find(|&i| self.nodes[i].child.is_some())
                .expect("a live node");
            match self.try_ctl(live, &["cluster_status", "--formatter", "json"]) {
                Ok(out) => {
                    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
                    let running = v["running_nodes"].as_array().map_or(0, Vec::len);
                    if running >= n {
                        return;
                    }
                    last = out;
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("the cluster did not reach {n} running nodes: {last}");
    }

    /// Kills node `i` with SIGKILL (no goodbye to clients or peers).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.nodes[i].dir.join("pid"));
    }

    /// Starts node `i` again (with its data: it rejoins the cluster) and
    /// waits until every node runs.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.await_startup(i);
        self.await_running(self.nodes.len());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// Stops the nodes an aborted earlier run left under `base` (by the pids
/// it recorded, only if they still are those nodes), and removes `base`.
fn stop_stale(base: &Path) {
    if let Ok(entries) = fs::read_dir(base) {
        for e in entries.flatten() {
            let Ok(pid) = fs::read_to_string(e.path().join("pid")) else {
                continue;
            };
            let pid = pid.trim();
            // Only a node of this directory (its data path is in its
            // environment), never a process that reused the pid.
            let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&environ).contains(&format!(
                "RABBITMQ_MNESIA_BASE={}",
                e.path().join("mnesia").display()
            ));
            if ours {
                let _ = Command::new("kill").args(["-9", pid]).status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    let _ = fs::remove_dir_all(base);
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod the cookie");
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) {}
