import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real libvirtd for tests (qemu:///system; no systemd needed, see live-backup.md part 2):
/// one already answering is used as it is; otherwise virtlogd and libvirtd are started here
/// in the foreground as children and stopped by their PIDs in `stop()`. Suites running at the
/// same time in one test process share the daemons: the last `stop()` stops them.
public final class LibvirtDaemon: @unchecked Sendable {
    public let uri = "qemu:///system"
    private var children: [pid_t] = []
    private var stopped = false

    /// The daemons this process started, and how many fixtures use them.
    private static let shared = NSRecursiveLock()
    nonisolated(unsafe) private static var users = 0
    nonisolated(unsafe) private static var started: [pid_t] = []

    public init() throws {
        _ = try Tools.which("virsh", hint: "libvirt-clients")
        Self.shared.lock()
        defer { Self.shared.unlock() }
        if Self.users > 0 || answers() {
            Self.users += 1
            return
        }
        let libvirtd = try Tools.which("libvirtd", hint: "libvirt-daemon-system")
        let virtlogd = try Tools.which("virtlogd", hint: "libvirt-daemon-system")
        if (try? Tools.run("pgrep", ["-x", "virtlogd"]).status) != 0 { try spawn(virtlogd) }
        try spawn(libvirtd)
        // The first start probes QEMU's capabilities (about 8 s here, cached afterwards).
        let deadline = Date().addingTimeInterval(60)
        while !answers() {
            guard Date() < deadline, children.allSatisfy(isRunning) else {
                stopChildren()
                stopped = true
                throw Tools.MissingTool(name: "a libvirtd that answers (it did not start)", package: "libvirt-daemon-system")
            }
            usleep(200_000)
        }
        Self.started = children
        children = []
        Self.users += 1
    }

    deinit { stop() }

    private func answers() -> Bool {
        (try? Tools.run("virsh", ["-c", uri, "version"]).status) == 0
    }

    /// Starts `path` in the foreground as a child (ChildProcess: an empty signal mask, output to /dev/null).
    private func spawn(_ path: String) throws {
        children.append(try ChildProcess.spawn(path, [], output: "/dev/null"))
    }

    private func isRunning(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == 0
    }

    /// Lets go of the daemons; the last user stops those this process started (newest first), by PID.
    public func stop() {
        Self.shared.lock()
        defer { Self.shared.unlock() }
        guard !stopped else { return }
        stopped = true
        Self.users -= 1
        guard Self.users == 0 else { return }
        children = Self.started
        Self.started = []
        stopChildren()
    }

    /// Runs `body` with the daemon to the caller alone: waits until no other suite of this
    /// process uses it (a restart would cut their connections) and holds the fixture's lock
    /// meanwhile, so that none starts using it.
    public func alone<T>(_ body: () throws -> T) throws -> T {
        let deadline = Date().addingTimeInterval(300)
        Self.shared.lock()
        defer { Self.shared.unlock() }
        while Self.users > 1 {
            Self.shared.unlock()
            usleep(100_000)
            Self.shared.lock()
            guard Date() < deadline else {
                throw Tools.MissingTool(name: "libvirtd to one suite (others of this process still use it after 300 s)",
                                        package: "libvirt-daemon-system")
            }
        }
        return try body()
    }

    /// Restarts libvirtd as an admin would (call it inside `alone`): the running one is stopped
    /// (SIGTERM) by the PID in its pid file, and a new one is started as a child of this
    /// process, which the last `stop()` stops by its PID. QEMU and its jobs outlive it
    /// (libvirtd reconnects to them).
    public func restartDaemon() throws {
        let libvirtd = try Tools.which("libvirtd", hint: "libvirt-daemon-system")
        Self.shared.lock()
        defer { Self.shared.unlock() }
        let text = (try? String(contentsOfFile: "/run/libvirtd.pid", encoding: .utf8)) ?? ""
        guard let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else {
            throw Tools.MissingTool(name: "a libvirtd pid file (/run/libvirtd.pid: '\(text)')", package: "libvirt-daemon-system")
        }
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(15)
        if let ours = Self.started.firstIndex(of: pid) {
            while isRunning(pid) && Date() < deadline { usleep(50_000) }
            Self.started.remove(at: ours)
        } else {
            while kill(pid, 0) == 0 && Date() < deadline { usleep(50_000) }
        }
        guard kill(pid, 0) != 0 else {
            throw Tools.MissingTool(name: "a libvirtd that stops on SIGTERM (pid \(pid) still runs)", package: "libvirt-daemon-system")
        }
        let child = try ChildProcess.spawn(libvirtd, [], output: "/dev/null")
        Self.started.append(child)
        while !answers() {
            guard Date() < deadline.addingTimeInterval(45), isRunning(child) else {
                throw Tools.MissingTool(name: "a libvirtd that answers after a restart", package: "libvirt-daemon-system")
            }
            usleep(100_000)
        }
    }

    private func stopChildren() {
        for pid in children.reversed() {
            kill(pid, SIGTERM)
            let deadline = Date().addingTimeInterval(15)
            while isRunning(pid) && Date() < deadline { usleep(50_000) }
            if isRunning(pid) {
                kill(pid, SIGKILL)
                var status: Int32 = 0
                waitpid(pid, &status, 0)
            }
        }
        children = []
    }

    /// `virsh -c URI ARGS`.
    @discardableResult
    public func virsh(_ arguments: [String]) throws -> Tools.Result {
        try Tools.run("virsh", ["-q", "-c", uri] + arguments)
    }

    /// The domain's state as `virsh domstate` says it ("running", "paused", "shut off", …).
    public func state(_ domain: String) throws -> String {
        try virsh(["domstate", domain]).stdout.split(separator: "\n").first.map(String.init) ?? ""
    }

    /// Defines a TCG domain with no OS (64 MiB, one virtio disk `disk`), starts it paused and
    /// resumes it (libvirt refuses to shut down a paused domain): SeaBIOS finds nothing to
    /// boot, so the guest never acts on an ACPI shutdown request.
    public func startDomainWithoutOS(_ name: String, disk: String) throws {
        try define(name, disks: [("vda", disk)])
        for arguments in [["start", name, "--paused"], ["resume", name]] { try must(arguments) }
    }

    /// Defines a TCG domain with no OS and these disks (target, qcow2 file), starts it and keeps
    /// it paused: no guest runs, QEMU takes no CPU, and `write` simulates the guest.
    public func startPausedDomain(_ name: String, disks: [(target: String, file: String)]) throws {
        try define(name, disks: disks)
        try must(["start", name, "--paused"])
    }

    /// `virsh ARGS`, which must succeed.
    @discardableResult
    public func must(_ arguments: [String]) throws -> Tools.Result {
        let result = try virsh(arguments)
        guard result.status == 0 else {
            throw Tools.MissingTool(name: "a libvirt domain (virsh \(arguments.joined(separator: " ")): \(result.stderr))",
                                    package: "libvirt-daemon-system qemu-system-x86")
        }
        return result
    }

    private func define(_ name: String, disks: [(target: String, file: String)]) throws {
        let devices = disks.map { disk in
            """
                <disk type='file' device='disk'>
                  <driver name='qemu' type='qcow2'/>
                  <source file='\(disk.file)'/>
                  <target dev='\(disk.target)' bus='virtio'/>
                </disk>
            """
        }.joined(separator: "\n")
        let xml = """
            <domain type='qemu'>
              <name>\(name)</name>
              <memory unit='MiB'>64</memory>
              <vcpu>1</vcpu>
              <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
              <features><acpi/></features>
              <on_poweroff>destroy</on_poweroff>
              <on_reboot>destroy</on_reboot>
              <on_crash>destroy</on_crash>
              <devices>
                <emulator>/usr/bin/qemu-system-x86_64</emulator>
            \(devices)
                <controller type='usb' model='none'/>
                <memballoon model='none'/>
              </devices>
            </domain>
            """
        let file = ((disks.first?.file ?? "/tmp/x") as NSString).deletingLastPathComponent + "/\(name).xml"
        try xml.write(toFile: file, atomically: true, encoding: .utf8)
        try must(["define", file])
    }

    /// A guest write of `length` bytes of `pattern` at `offset` to disk number `index` (0 = the
    /// first virtio disk), through HMP qemu-io on the device's backend, as guest I/O goes.
    public func write(_ domain: String, disk index: Int = 0, _ pattern: UInt8, at offset: Int, length: Int) throws {
        let device = "/machine/peripheral/virtio-disk\(index)/virtio-backend"
        let result = try must(["qemu-monitor-command", domain, "--hmp",
                               "qemu-io -d \(device) \"write -P \(pattern) \(offset) \(length)\""])
        // HMP errors come back as reply text with exit status 0.
        let reply = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        guard reply.isEmpty else { throw Tools.MissingTool(name: "an HMP qemu-io write (\(reply))", package: "qemu-system-x86") }
    }

    /// A guest flush of disk number `index` (what a guest does before its writes must survive a crash).
    public func flush(_ domain: String, disk index: Int = 0) throws {
        let device = "/machine/peripheral/virtio-disk\(index)/virtio-backend"
        try must(["qemu-monitor-command", domain, "--hmp", "qemu-io -d \(device) \"flush\""])
    }

    /// The domain's checkpoint names, parents first.
    public func checkpoints(_ domain: String) throws -> [String] {
        try must(["checkpoint-list", domain, "--name", "--topological"]).stdout.split(separator: "\n")
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    /// Destroys (if running) and undefines the domain, with its checkpoints' metadata.
    public func remove(_ domain: String) {
        _ = try? virsh(["destroy", domain])
        _ = try? virsh(["undefine", domain, "--checkpoints-metadata"])
    }
}

