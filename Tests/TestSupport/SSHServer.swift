import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real OpenSSH server for tests: `sshd -D -e -f CONFIG` on a free port of 127.0.0.1, with a
/// host key and a client key made by `ssh-keygen` in a temp dir and a private config (the
/// client key's public half as its AuthorizedKeysFile, StrictModes no, UsePAM no, UseDNS no),
/// run in the foreground as a child of the test process and stopped by its PID in `stop()`.
/// `sshCommand` is the client command line, usable as rsync's `-e` and as qbackup's
/// `--ssh-command`; `run` runs one remote command through it.
public final class SSHServer: @unchecked Sendable {
    public let host = "127.0.0.1"
    public private(set) var port: UInt16 = 0
    /// The account the tests log in as: the one running the tests (root in CI).
    public let user: String
    /// The client's private key (its public half is the only authorized key).
    public let keyFile: String
    /// A known_hosts file naming this server's host key for `[127.0.0.1]:PORT`, for clients
    /// that check host keys (libvirt's qemu+ssh with `known_hosts=`); `sshCommand` does not.
    public let knownHostsFile: String
    /// sshd's own log (`-e`: to stderr, which goes to this file), read when something fails.
    public let logFile: String
    private let directory: TempDir
    private var pid: pid_t = 0

    /// How long one readiness probe (`ssh … true`) may take before it is killed and reaped.
    static let probeTimeout: TimeInterval = 5
    /// How long the server may take to answer its first probe.
    static let startTimeout: TimeInterval = 30

    /// Makes the keys and the config and starts sshd; returns once a real `ssh … true` logged in.
    /// `extraConfig` lines are appended to the config (a test of the fixture's failure path).
    public init(extraConfig: [String] = []) throws {
        let sshd = try Tools.which("sshd", hint: "openssh-server")
        let keygen = try Tools.which("ssh-keygen", hint: "openssh-client")
        _ = try Tools.which("ssh", hint: "openssh-client")
        directory = TempDir("qbackup-sshd")
        user = String(cString: getpwuid(getuid()).pointee.pw_name)
        keyFile = directory.file("client_key")
        knownHostsFile = directory.file("known_hosts")
        logFile = directory.file("sshd.log")
        let hostKey = directory.file("host_key")
        for key in [hostKey, keyFile] {
            let made = try Tools.run(keygen, ["-q", "-t", "ed25519", "-N", "", "-C", "qbackup-test", "-f", key])
            guard made.status == 0 else { throw Tools.ToolFailure(command: "ssh-keygen -f \(key)", result: made) }
        }
        try FileManager.default.copyItem(atPath: keyFile + ".pub", toPath: directory.file("authorized_keys"))
        // sshd's privilege separation folder (Debian's package makes it at boot, a container may lack it).
        if !FileManager.default.fileExists(atPath: "/run/sshd") {
            try FileManager.default.createDirectory(atPath: "/run/sshd", withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o755])
        }
        let hostPublic = try String(contentsOfFile: hostKey + ".pub", encoding: .utf8)
            .split(separator: " ").prefix(2).joined(separator: " ")
        // A port found free can be taken before sshd binds it: a bind failure tries another port.
        var lastFailure = ""
        for _ in 0..<5 {
            port = try Self.freePort()
            let config = directory.file("sshd_config")
            try ([
                "Port \(port)", "ListenAddress \(host)", "HostKey \(hostKey)",
                "AuthorizedKeysFile \(directory.file("authorized_keys"))", "StrictModes no",
                "PidFile \(directory.file("sshd.pid"))", "UsePAM no", "UseDNS no",
                "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "LogLevel VERBOSE", "MaxStartups 100:30:200",
            ] + extraConfig).joined(separator: "\n").appending("\n").write(toFile: config, atomically: true, encoding: .utf8)
            try "[\(host)]:\(port) \(hostPublic)\n".write(toFile: knownHostsFile, atomically: true, encoding: .utf8)
            // sshd re-executes itself, so it must be started by its absolute path.
            pid = try ChildProcess.spawn(sshd, ["-D", "-e", "-f", config], output: logFile)
            switch try waitUntilReady() {
            case .ready: return
            case .portTaken(let log): lastFailure = log
            }
        }
        throw SSHServerFailure(message: "sshd found no free port in 5 tries", log: lastFailure)
    }

    deinit { stop() }

    /// `ssh -p PORT -i KEY …` without the destination: the command rsync's `-e` and qbackup's
    /// `--ssh-command` take. BatchMode never asks for a password; the host key is not checked.
    public var sshCommand: String {
        "ssh -p \(port) -i \(keyFile) -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
            + "-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=5"
    }

    /// `user@127.0.0.1`, the destination of `sshCommand`.
    public var destination: String { "\(user)@\(host)" }

    /// `ssh://user@127.0.0.1:PORT/path`: a qbackup replicate destination on this server.
    public func url(_ path: String) -> String { "ssh://\(destination):\(port)\(path)" }

    /// Runs `command` on the server through `sshCommand` (at most `seconds`, then killed and reaped).
    public func run(_ command: String, seconds: TimeInterval = 60) throws -> Tools.Result {
        let arguments = sshCommand.split(separator: " ").dropFirst().map(String.init) + [destination, command]
        return try ChildProcess.run(try Tools.which("ssh"), arguments, seconds: seconds, directory: directory)
    }

    private enum Start { case ready, portTaken(String) }

    /// Probes with a real login until one succeeds; each probe is timed out and reaped, and
    /// sshd's own log is the error when it exits or never answers.
    private func waitUntilReady() throws -> Start {
        let deadline = Date().addingTimeInterval(Self.startTimeout)
        while true {
            if ChildProcess.reapIfExited(pid) {
                let log = (try? String(contentsOfFile: logFile, encoding: .utf8)) ?? ""
                pid = 0
                if log.contains("Address already in use") { return .portTaken(log) }
                throw SSHServerFailure(message: "sshd exited before it answered", log: log)
            }
            let probe = try run("true", seconds: Self.probeTimeout)
            if probe.status == 0 { return .ready }
            guard Date() < deadline else {
                stop()
                let log = (try? String(contentsOfFile: logFile, encoding: .utf8)) ?? ""
                throw SSHServerFailure(message: "sshd did not let `ssh … true` in within \(Int(Self.startTimeout)) s "
                                       + "(last probe exited \(probe.status): \(probe.stderr))", log: log)
            }
            usleep(100_000)
        }
    }

    /// Stops sshd by its PID (SIGTERM, then SIGKILL after 10 s) and reaps it.
    public func stop() {
        guard pid > 0 else { return }
        ChildProcess.stop(pid)
        pid = 0
    }

    /// Whether the server process runs (false once stopped).
    public var isRunning: Bool { pid > 0 && !ChildProcess.reapIfExited(pid) }

    /// A free TCP port of 127.0.0.1 (bound to port 0, read back, closed).
    static func freePort() throws -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw SSHServerFailure(message: "socket: \(String(cString: strerror(errno)))", log: "") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard bound else { throw SSHServerFailure(message: "bind: \(String(cString: strerror(errno)))", log: "") }
        return UInt16(bigEndian: address.sin_port)
    }
}

/// sshd did not start or answer; `log` is what it wrote with `-e`.
public struct SSHServerFailure: Error, CustomStringConvertible {
    public let message: String
    public let log: String
    public var description: String { "\(message)\n--- sshd -e log ---\n\(log)" }
}

/// Children started with `posix_spawn`, their output in a file (no pipe that a grandchild
/// holding it open could keep from ending), waited for with a deadline and always reaped.
public enum ChildProcess {
    /// Starts `path ARGS` with stdin from /dev/null, stdout appended to `output` and stderr to
    /// `errors` (to `output` too when nil), with an empty signal mask and default handlers (the test runner's threads block
    /// SIGTERM, which a child would inherit and then never stop on).
    public static func spawn(_ path: String, _ arguments: [String], output: String, errors: String? = nil) throws -> pid_t {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        if let errors {
            posix_spawn_file_actions_addopen(&actions, 2, errors, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        } else {
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for arg in argv { free(arg) } }
        var pid = pid_t()
        let rc = posix_spawn(&pid, path, &actions, &attributes, argv, environ)
        guard rc == 0 else {
            throw Tools.ToolFailure(command: "posix_spawn \(path)",
                                    result: Tools.Result(status: rc, stdout: "", stderr: String(cString: strerror(rc)),
                                                         stdoutData: Data()))
        }
        return pid
    }

    /// Runs `path ARGS` for at most `seconds`: on timeout it is killed (SIGKILL) and reaped, and
    /// the result's status is -1 with "timed out" in stderr. Output goes through files in `directory`.
    public static func run(_ path: String, _ arguments: [String], seconds: TimeInterval,
                           directory: TempDir) throws -> Tools.Result {
        let tag = UUID().uuidString.prefix(8)
        let out = directory.file("child-\(tag).out")
        let err = directory.file("child-\(tag).err")
        defer {
            try? FileManager.default.removeItem(atPath: out)
            try? FileManager.default.removeItem(atPath: err)
        }
        let pid = try spawn(path, arguments, output: out, errors: err)
        let deadline = Date().addingTimeInterval(seconds)
        var status: Int32 = 0
        var exited = false
        while !exited {
            let rc = waitpid(pid, &status, WNOHANG)
            if rc == pid || (rc < 0 && errno != EINTR) {
                exited = true
            } else if Date() >= deadline {
                kill(pid, SIGKILL)
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                let text = (try? String(contentsOfFile: err, encoding: .utf8)) ?? ""
                return Tools.Result(status: -1, stdout: "", stderr: "timed out after \(seconds) s\n" + text, stdoutData: Data())
            } else {
                usleep(10_000)
            }
        }
        let data = (try? Data.contents(of: out)) ?? Data()
        let text = (try? String(contentsOfFile: err, encoding: .utf8)) ?? ""
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Tools.Result(status: code, stdout: String(decoding: data, as: UTF8.self), stderr: text, stdoutData: data)
    }

    /// Whether `pid` (a child of this process) has exited; reaps it if so.
    public static func reapIfExited(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        let rc = waitpid(pid, &status, WNOHANG)
        return rc == pid || (rc < 0 && errno == ECHILD)
    }

    /// SIGTERM, up to 10 s for it to exit, then SIGKILL; reaped in every case.
    public static func stop(_ pid: pid_t) {
        guard !reapIfExited(pid) else { return }
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if reapIfExited(pid) { return }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }
}
