import Foundation
import LiveSource
#if canImport(Glibc)
import Glibc
#endif

/// A real QEMU with one virtio-blk disk and no guest OS (`-M q35 -S`: the vCPUs
/// never run), for live-backup tests. It has two QMP monitors: `qmpSocket` for
/// qbackup and `monitorSocket` for the test (a monitor serves one client at a
/// time). "Guest" writes go through the device's BlockBackend with HMP
/// `qemu-io -d <qdev path>`. Always quit and then killed by pid.
public final class QemuVM {
    public let disk: String
    public let qmpSocket: String
    public let monitorSocket: String
    /// The disk's format node.
    public let node: String
    public let pid: pid_t
    /// The test's own monitor.
    public let monitor: QMPClient
    /// The QOM path of the disk's virtio backend (from query-block), for qemu-io.
    public let qdev: String

    /// Starts QEMU on `disk` (format `format`, node `node`) with its monitors in `directory`;
    /// `otherDisks` (qcow2) become more virtio-blk devices, nodes `disk1`, `disk2`, ….
    public init(disk: String, directory: TempDir, format: String = "qcow2", node: String = "disk0",
                otherDisks: [String] = []) throws {
        let tag = UUID().uuidString.prefix(6)
        self.disk = disk
        self.node = node
        qmpSocket = directory.file("qmp-\(tag).sock")
        monitorSocket = directory.file("mon-\(tag).sock")
        let pidFile = directory.file("qemu-\(tag).pid")
        let qemu = try Tools.which("qemu-system-x86_64", hint: "qemu-system-x86")
        // The daemon outlives this call: close every inherited descriptor above stderr (as QemuNBD does).
        let closeInherited = "for fd in $(ls /proc/$$/fd); do if [ \"$fd\" -gt 2 ]; then eval \"exec $fd>&-\" 2>/dev/null; fi; done; exec \"$@\""
        let protocolNode = "\(node)-file"
        try Tools.qemu("bash", ["-c", closeInherited, "qemu", qemu,
                                "-M", "q35", "-S", "-m", "64", "-accel", "tcg", "-nodefaults", "-display", "none",
                                "-daemonize", "-pidfile", pidFile,
                                "-qmp", "unix:\(qmpSocket),server=on,wait=off",
                                "-qmp", "unix:\(monitorSocket),server=on,wait=off",
                                "-blockdev", "driver=file,node-name=\(protocolNode),filename=\(disk)",
                                "-blockdev", "driver=\(format),node-name=\(node),file=\(protocolNode)",
                                "-device", "virtio-blk-pci,drive=\(node),id=vda"]
                                + otherDisks.enumerated().flatMap { i, path in
                                    ["-blockdev", "driver=file,node-name=disk\(i + 1)-file,filename=\(path)",
                                     "-blockdev", "driver=qcow2,node-name=disk\(i + 1),file=disk\(i + 1)-file",
                                     "-device", "virtio-blk-pci,drive=disk\(i + 1),id=vd\(i + 1)"]
                                })
        let text = (try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? ""
        guard let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else {
            throw Tools.ToolFailure(command: "qemu-system-x86_64 -daemonize (no pid file)",
                                    result: Tools.Result(status: -1, stdout: "", stderr: text, stdoutData: Data()))
        }
        self.pid = pid
        do {
            monitor = try QMPClient(path: monitorSocket)
            let devices = try monitor.execute("query-block") as? [[String: Any]] ?? []
            guard let qdev = devices.compactMap({ $0["qdev"] as? String }).first else {
                throw Tools.MissingTool(name: "a virtio-blk device in query-block")
            }
            self.qdev = qdev
        } catch {
            kill(pid, SIGKILL)
            throw error
        }
    }

    deinit { stop() }

    /// A guest write of `length` bytes of `pattern` at `offset`.
    public func write(_ pattern: UInt8, at offset: UInt64, length: UInt64) throws {
        try qemuIO("write -P \(pattern) \(offset) \(length)")
    }

    /// A guest write of zeros (`write -z`).
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try qemuIO("write -z \(offset) \(length)")
    }

    /// A guest flush: what the guest wrote is on disk (a kill -9 after it loses nothing).
    public func flush() throws {
        try qemuIO("flush")
    }

    private func qemuIO(_ command: String) throws {
        let output = try monitor.hmp("qemu-io -d \(qdev) \"\(command)\"")
        // qemu-io's own output goes to QEMU's stdout; an error comes back as the HMP reply.
        guard output.isEmpty else {
            throw Tools.ToolFailure(command: "qemu-io -d \(qdev) \"\(command)\"",
                                    result: Tools.Result(status: 1, stdout: "", stderr: output, stdoutData: Data()))
        }
    }

    /// `query-block-exports`, `query-block-jobs` and the node names of `query-named-block-nodes`.
    public func leftovers() throws -> (exports: Int, jobs: Int, nodes: [String]) {
        let exports = (try monitor.execute("query-block-exports") as? [Any])?.count ?? -1
        let jobs = (try monitor.execute("query-block-jobs") as? [Any])?.count ?? -1
        let nodes = (try monitor.execute("query-named-block-nodes", ["flat": true]) as? [[String: Any]] ?? [])
            .compactMap { $0["node-name"] as? String }
        return (exports, jobs, nodes)
    }

    /// The persistent bitmaps of the format node: name → (recording, count, inconsistent).
    public func bitmaps() throws -> [String: (recording: Bool, count: UInt64, inconsistent: Bool)] {
        let nodes = try monitor.execute("query-named-block-nodes", ["flat": true]) as? [[String: Any]] ?? []
        var out: [String: (recording: Bool, count: UInt64, inconsistent: Bool)] = [:]
        for n in nodes where n["node-name"] as? String == node {
            for b in n["dirty-bitmaps"] as? [[String: Any]] ?? [] {
                guard let name = b["name"] as? String else { continue }
                out[name] = (b["recording"] as? Bool ?? false, (b["count"] as? NSNumber)?.uint64Value ?? 0,
                             b["inconsistent"] as? Bool ?? false)
            }
        }
        return out
    }

    /// `quit` (QEMU writes its persistent bitmaps and closes the image), then waits until it is gone.
    public func quit() {
        _ = try? monitor.execute("quit", timeout: 5)
        waitGone(seconds: 10)
        stop()
    }

    /// Kills QEMU with SIGKILL (no clean close: persistent bitmaps stay in_use in the file).
    public func stop() {
        monitor.close()
        guard QemuNBD.isAlive(pid) else { return }
        kill(pid, SIGKILL)
        waitGone(seconds: 10)
    }

    private func waitGone(seconds: TimeInterval) {
        let deadline = Date().addingTimeInterval(seconds)
        while QemuNBD.isAlive(pid) && Date() < deadline { usleep(2_000) }
    }
}
