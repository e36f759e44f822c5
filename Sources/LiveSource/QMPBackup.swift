import BackupChain
import FoundationEssentials
import Glibc
import Logging
import QCowImage

/// `qbackup backup --qmp SOCKET`: a backup of a running QEMU's disk through a
/// fleecing export, into the same repository and chain as offline backups of
/// the same image file, with the same bitmap NAME (persistent in QEMU).
///
/// Stable-name scheme (live-backup.md §3.2): NAME always records. At start one
/// transaction moves its bits into a disabled NAME.frozen, clears NAME and
/// starts fleecing; NAME.frozen is what the export serves. When the layer is
/// durable NAME.frozen is dropped; on any failure its bits are merged back into
/// NAME, so no change is lost; a NAME.frozen left by a crash is merged back
/// before anything else.
public enum QMPBackup {
    public struct Request: Sendable {
        public var socket: String
        public var node: String?
        public var repository: String
        public var bitmap: String?
        public var mode: BackupEngine.Mode
        public var compression: CompressionType?
        /// Folder of the fleecing overlay and of qbackup's NBD socket (default: the image file's folder).
        public var fleeceDir: String?
        /// An NBD server QEMU already runs (`unix:PATH` or `HOST:PORT`); default: qbackup starts its own.
        public var nbdServer: String?
        public var dryRun: Bool
        public var clusterSize: Int?
        public var takeOverBitmap: Bool
        /// How long each QMP command, event and NBD request may take.
        public var timeout: TimeInterval
        public init(socket: String, node: String? = nil, repository: String, bitmap: String? = nil,
                    mode: BackupEngine.Mode = .auto, compression: CompressionType? = nil,
                    fleeceDir: String? = nil, nbdServer: String? = nil, dryRun: Bool = false, clusterSize: Int? = nil,
                    takeOverBitmap: Bool = false, timeout: TimeInterval = 60) {
            self.socket = socket
            self.node = node
            self.repository = repository
            self.bitmap = bitmap
            self.mode = mode
            self.compression = compression
            self.fleeceDir = fleeceDir
            self.nbdServer = nbdServer
            self.dryRun = dryRun
            self.clusterSize = clusterSize
            self.takeOverBitmap = takeOverBitmap
            self.timeout = timeout
        }
    }

    /// The engine's result, and why a full layer was taken when one was (nil otherwise).
    public struct Outcome: Sendable {
        public var result: BackupEngine.Result
        public var reason: String?
        public var warnings: [String]
    }

    public static func backup(_ request: Request, logger: Logger = Logger(label: "qbackup.qmp"),
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Outcome {
        let server = try request.nbdServer.map { try FleeceSession.Server(parsing: $0) } ?? .own
        let qmp = try QMPClient(path: request.socket, timeout: request.timeout)
        defer { qmp.close() }
        var disk = try QMPDisk.find(qmp, node: request.node)
        let engine = BackupEngine.Request(image: disk.file, repository: request.repository, bitmap: request.bitmap,
                                          mode: request.mode, compression: request.compression,
                                          dryRun: request.dryRun, clusterSize: request.clusterSize)
        if request.dryRun {
            let repo = try BackupRepository(path: request.repository, exclusive: false, allowMissing: true)
            _ = try BackupEngine.preflight(engine, repo: repo, virtualSize: disk.virtualSize)
            let plan = try BitmapPlan(request: request, manifest: repo.manifest, disk: disk)
            let bytes = plan.incremental ? disk.bitmaps[plan.name]?.count ?? 0 : disk.virtualSize
            let result = BackupEngine.Result.dryRun(kind: plan.incremental ? .incremental : .full,
                                                    index: repo.manifest?.layers.count ?? 0, bitmap: plan.name,
                                                    bytes: bytes, virtualSize: disk.virtualSize)
            return Outcome(result: result, reason: plan.reason, warnings: [])
        }

        var session: FleeceSession?
        var source: NBDSource?
        var plan: BitmapPlan?
        var warnings: [String] = []
        let result: BackupEngine.Result
        do {
            result = try BackupEngine.backup(engine, logger: logger, progress: progress) { repo, engineRequest in
                _ = try BackupEngine.preflight(engine, repo: repo, virtualSize: disk.virtualSize)
                let id = repo.manifest?.id ?? newRepositoryID(repo.path)
                let folder = request.fleeceDir ?? URL(fileURLWithPath: disk.file).deletingLastPathComponent().path
                let names = FleeceSession.Names(id: id, folder: folder)
                try FleeceSession.removeLeftovers(qmp: qmp, names: names, logger: logger)
                // A NAME.frozen left by a crash holds changes no layer has: put them back first.
                let name = repo.manifest?.bitmap ?? request.bitmap ?? "qbackup-\(id)"
                if disk.bitmaps[BitmapPlan.frozen(name)] != nil {
                    warnings.append(try BitmapPlan.mergeBack(qmp, disk: disk, name: name))
                    disk = try QMPDisk.find(qmp, node: disk.node)
                }
                let settled = try BitmapPlan(request: request, manifest: repo.manifest, disk: disk, id: id)
                plan = settled
                engineRequest.repositoryID = id
                engineRequest.bitmap = settled.name
                engineRequest.mode = settled.incremental ? .incremental : .full
                // The bitmap is QEMU's, checked above; the engine must not look for it in a file.
                engineRequest.takeOverBitmap = true
                try settled.prepare(qmp, node: disk.node)
                let fleece = FleeceSession(qmp: qmp, disk: disk, names: names, server: server, logger: logger)
                session = fleece
                try fleece.start(bitmapActions: settled.startActions(node: disk.node),
                                 exportBitmaps: settled.incremental ? [BitmapPlan.frozen(settled.name)] : [])
                let nbd = try NBDSource(uri: fleece.uri, name: disk.file,
                                        tracking: settled.incremental
                                            ? NBDSource.Tracking(name: settled.name, exported: BitmapPlan.frozen(settled.name))
                                            : nil,
                                        mode: .qmp, timeout: request.timeout)
                // The repository belongs to the image file behind the node, as an offline backup's would.
                nbd.disk = .localFile(disk.file)
                nbd.pointInTimeCheck = { try fleece.checkPointInTime() }
                source = nbd
                return nbd
            }
        } catch {
            finish(qmp: qmp, disk: disk, session: session, plan: plan, committed: source?.committed ?? false,
                   logger: logger, warnings: &warnings)
            throw error
        }
        finish(qmp: qmp, disk: disk, session: session, plan: plan, committed: source?.committed ?? false,
               logger: logger, warnings: &warnings)
        return Outcome(result: result, reason: plan?.reason, warnings: warnings)
    }

    /// The id of a repository that has no manifest yet: derived from its folder (FNV-1a of the
    /// absolute path), so that a first backup killed before its manifest names the same QEMU
    /// objects as the next attempt, which then recognises and removes them.
    static func newRepositoryID(_ path: String) -> String {
        let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in absolute.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return String(printf: "%016llx", hash)
    }

    /// Cleanup, then the bitmaps: dropped NAME.frozen after a committed layer, merged back otherwise.
    private static func finish(qmp: QMPClient, disk: QMPDisk, session: FleeceSession?, plan: BitmapPlan?,
                               committed: Bool, logger: Logger, warnings: inout [String]) {
        if let problem = session?.teardown() {
            warnings.append("cleaning up in QEMU failed (the next backup retries): \(problem)")
        }
        guard let plan, session?.pointInTimeTaken == true else {
            for warning in warnings { logger.warning("\(warning)") }
            return
        }
        do {
            try plan.finish(qmp, node: disk.node, committed: committed)
        } catch {
            warnings.append("bitmap '\(plan.name)': \(error) (the next backup puts it right)")
        }
        for warning in warnings { logger.warning("\(warning)") }
    }
}
