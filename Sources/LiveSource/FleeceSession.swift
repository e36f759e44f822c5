import FoundationEssentials
import Glibc
import Logging
import QCowImage

/// The point-in-time export of a running disk (live-backup.md §3.1/§3.2): a
/// qcow2 overlay backed by the disk, a `blockdev-backup sync=none` job that
/// copies old data into it before the guest overwrites it, started in one QMP
/// transaction with the bitmap actions, and a read-only NBD export of the
/// overlay. Every object is named after the repository id, so what a killed run
/// left behind is recognised and removed by the next one.
final class FleeceSession {
    /// The names of everything qbackup makes for one repository.
    struct Names {
        let id: String
        let folder: String
        var node: String { "qb-fleece-\(id)" }
        var filter: String { "qb-cbw-\(id)" }
        var job: String { "qb-job-\(id)" }
        /// The export's id and its NBD name.
        var export: String { "qb-export-\(id)" }
        var overlay: String { "\(folder)/.qbackup-fleece-\(id).qcow2" }
        var serverSocket: String { "\(folder)/.qbackup-nbd-\(id).sock" }
    }

    /// Where the export is served: qbackup's own server, or one QEMU already runs (`--nbd-server`).
    enum Server {
        case own
        case unix(String)
        case tcp(host: String, port: String)

        /// `unix:PATH` or `HOST:PORT` (`[v6]:PORT`).
        init(parsing text: String) throws {
            if text.hasPrefix("unix:") {
                let path = String(text.dropFirst(5))
                guard !path.isEmpty else { throw LiveError(.invalidArgument, "--nbd-server unix: needs a socket path") }
                self = .unix(path)
                return
            }
            guard let colon = text.lastIndex(of: ":"), colon != text.startIndex,
                  let port = UInt16(text[text.index(after: colon)...]), port > 0
            else { throw LiveError(.invalidArgument, "--nbd-server '\(text)' is neither unix:PATH nor HOST:PORT") }
            self = .tcp(host: String(text[..<colon]), port: String(port))
        }
    }

    let qmp: QMPClient
    let disk: QMPDisk
    let names: Names
    let server: Server
    let logger: Logger
    private var fileCreated = false
    private var nodeAdded = false
    private var serverStarted = false
    private var jobStarted = false
    private var exportAdded = false
    /// Whether the start transaction ran (the bitmap actions took effect), even after teardown.
    private(set) var pointInTimeTaken = false

    init(qmp: QMPClient, disk: QMPDisk, names: Names, server: Server, logger: Logger) {
        self.qmp = qmp
        self.disk = disk
        self.names = names
        self.server = server
        self.logger = logger
    }

    /// The export's URI for libnbd.
    var uri: String {
        switch server {
        case .own: return "nbd+unix:///\(names.export)?socket=\(names.serverSocket)"
        case .unix(let path): return "nbd+unix:///\(names.export)?socket=\(path)"
        case .tcp(let host, let port): return "nbd://\(host):\(port)/\(names.export)"
        }
    }

    // MARK: - Leftovers of a killed run

    /// Removes what a run for this repository left in QEMU and on disk: its export, job,
    /// overlay node and file, and its own NBD server. Objects of other names are not touched.
    static func removeLeftovers(qmp: QMPClient, names: Names, logger: Logger) throws {
        let exports = try qmp.execute("query-block-exports") as? [[String: Any]] ?? []
        if exports.contains(where: { $0["id"] as? String == names.export }) {
            logger.warning("removing the NBD export a killed qbackup left", metadata: ["export": "\(names.export)"])
            try qmp.execute("block-export-del", ["id": names.export, "mode": "hard"])
            try qmp.waitForEvent("BLOCK_EXPORT_DELETED") { $0["id"] as? String == names.export }
        }
        let jobs = try qmp.execute("query-block-jobs") as? [[String: Any]] ?? []
        if jobs.contains(where: { $0["device"] as? String == names.job }) {
            logger.warning("cancelling the fleecing job a killed qbackup left", metadata: ["job": "\(names.job)"])
            try qmp.execute("block-job-cancel", ["device": names.job, "force": true])
            try qmp.waitForEvent("BLOCK_JOB_CANCELLED") { $0["device"] as? String == names.job }
        }
        let nodes = try qmp.execute("query-named-block-nodes", ["flat": true]) as? [[String: Any]] ?? []
        if nodes.contains(where: { $0["node-name"] as? String == names.node }) {
            logger.warning("removing the fleecing node a killed qbackup left", metadata: ["node": "\(names.node)"])
            try qmp.execute("blockdev-del", ["node-name": names.node])
        }
        if FileManager.default.fileExists(atPath: names.overlay) {
            try removeFile(names.overlay)
        }
        // Our server's socket path: if QEMU still serves it, the server is ours from a killed run.
        if FileManager.default.fileExists(atPath: names.serverSocket) {
            if socketAnswers(names.serverSocket) {
                logger.warning("stopping the NBD server a killed qbackup left", metadata: ["socket": "\(names.serverSocket)"])
                try qmp.execute("nbd-server-stop")
            }
            try? removeFile(names.serverSocket)
        }
    }

    /// Whether something accepts connections on the unix socket at `path`.
    static func socketAnswers(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
    }

    static func removeFile(_ path: String) throws {
        guard unlink(path) == 0 || errno == ENOENT else {
            throw LiveError(.io, "\(path): cannot remove: \(String(cString: strerror(errno)))")
        }
    }

    // MARK: - Setup

    /// Creates the overlay, adds its node, starts our NBD server, then runs one transaction:
    /// `bitmapActions` and the fleecing job (the point in time), and exports the overlay with
    /// `exportBitmaps`. On failure, whatever was made is for `teardown` to remove.
    func start(bitmapActions: [[String: Any]], exportBitmaps: [String]) throws {
        // 1. The overlay file: a qcow2 of the disk's size without a backing reference
        //    (blockdev-add names the backing node). It holds only data the guest overwrites.
        fileCreated = true
        let overlay = try QCowCreator.create(at: names.overlay, options: QCowCreateOptions(size: disk.virtualSize))
        overlay.close()
        try qmp.execute("blockdev-add", ["driver": "qcow2", "node-name": names.node, "discard": "unmap",
                                         "file": ["driver": "file", "filename": names.overlay], "backing": disk.node])
        nodeAdded = true
        // 2. Our own NBD server (QEMU runs at most one, and cannot say where it listens).
        if case .own = server {
            do {
                try qmp.execute("nbd-server-start", ["addr": ["type": "unix", "data": ["path": names.serverSocket]]])
            } catch let error as LiveError where error.message.contains("already running") {
                throw LiveError(.refused,
                                "QEMU already runs an NBD server that qbackup did not start (QEMU 7.2 cannot tell where it listens); name it with --nbd-server unix:PATH or --nbd-server HOST:PORT")
            }
            serverStarted = true
        }
        // 3. The point in time: bitmap actions and the fleecing job, atomically.
        let backup: [String: Any] = ["type": "blockdev-backup",
                                     "data": ["job-id": names.job, "device": disk.node, "target": names.node,
                                              "sync": "none", "filter-node-name": names.filter]]
        try qmp.execute("transaction", ["actions": bitmapActions + [backup]])
        jobStarted = true
        pointInTimeTaken = true
        // 4. The export (read-only; only disabled bitmaps may be exported).
        var export: [String: Any] = ["type": "nbd", "id": names.export, "node-name": names.node, "name": names.export,
                                     "writable": false]
        if !exportBitmaps.isEmpty { export["bitmaps"] = exportBitmaps }
        try qmp.execute("block-export-add", export)
        exportAdded = true
        logger.debug("fleecing export ready", metadata: ["uri": "\(uri)"])
        #if DEBUG
        DebugHold.here()
        #endif
    }

    // MARK: - While the copy runs

    /// The states of a job that still copies old data aside before the guest overwrites it.
    static let holdingStates: Set<String> = ["running", "paused", "ready", "standby"]

    /// Throws unless the fleecing job still holds the point in time. A job cancelled from
    /// outside (`block-job-cancel`) takes its copy-before-write filter with it, and the export
    /// goes on serving: reads made after that may see guest writes newer than the point.
    func checkPointInTime() throws {
        let jobs = try qmp.execute("query-block-jobs") as? [[String: Any]] ?? []
        let status = jobs.first { $0["device"] as? String == names.job }?["status"] as? String
        if let status, Self.holdingStates.contains(status) { return }
        if status == nil { jobStarted = false }
        throw LiveError(.io, "the fleecing job '\(names.job)' \(status.map { "is \($0)" } ?? "is gone") (cancelled outside qbackup?), so what was read may not be of the backup's point in time; no layer is recorded, and the next backup copies these changes again")
    }

    // MARK: - Cleanup

    /// Removes the export, job, overlay node and file and our server, in that order (each
    /// waits for the one before it: a node in use cannot be deleted). Runs every step even
    /// after a failed one (QEMU may be gone); returns the first failure's message.
    @discardableResult
    func teardown() -> String? {
        var firstError: String?
        func step(_ body: () throws -> Void) {
            do { try body() } catch { firstError = firstError ?? "\(error)" }
        }
        if exportAdded {
            step {
                try qmp.execute("block-export-del", ["id": names.export, "mode": "hard"])
                try qmp.waitForEvent("BLOCK_EXPORT_DELETED") { $0["id"] as? String == names.export }
            }
            exportAdded = false
        }
        if jobStarted {
            step {
                try qmp.execute("block-job-cancel", ["device": names.job, "force": true])
                try qmp.waitForEvent("BLOCK_JOB_CANCELLED") { $0["device"] as? String == names.job }
            }
            jobStarted = false
        }
        if nodeAdded {
            step { try qmp.execute("blockdev-del", ["node-name": names.node]) }
            nodeAdded = false
        }
        if fileCreated {
            step { try Self.removeFile(names.overlay) }
            fileCreated = false
        }
        if serverStarted {
            step { try qmp.execute("nbd-server-stop") }
            try? Self.removeFile(names.serverSocket)
            serverStarted = false
        }
        return firstError
    }
}
