import BackupChain
import BitmapStore
import FoundationEssentials
import Glibc
import Logging
import QCowImage

/// `qbackup backup --libvirt DOMAIN`: a disk of a VM that libvirt manages, through libvirt's
/// own API (never QMP behind its back): checkpoints and pull-mode backup.
///
/// A running domain: `virDomainBackupBegin` creates checkpoint `qbackup-<group>-<sequence>`
/// atomically with a point-in-time NBD export (incremental from the previous layer's
/// checkpoint); every read goes through `NBDSource`; the job is aborted (the normal end of a
/// pull job) only once the engine is done with the export. After the layer and manifest are
/// durable, every other checkpoint of this repository is deleted (each one costs every guest
/// write); a backup that failed deletes the checkpoint it created instead.
///
/// A shut-off domain: the layer is read from its disk file, the changes from the union of the
/// checkpoint bitmaps from the last layer's checkpoint on; no checkpoint is created and the
/// layer records that same one, so the next live backup starts from it.
public enum LibvirtBackup {
    public struct Request: Sendable {
        public var domain: String
        public var uri: String
        /// The disk target (`vda`); nil: the domain's only disk.
        public var disk: String?
        public var repository: String
        public var mode: BackupEngine.Mode
        public var compression: CompressionType?
        public var dryRun: Bool
        public var clusterSize: Int?
        /// How long each NBD request may take.
        public var timeout: TimeInterval
        public init(domain: String, uri: String = "qemu:///system", disk: String? = nil, repository: String,
                    mode: BackupEngine.Mode = .auto, compression: CompressionType? = nil, dryRun: Bool = false,
                    clusterSize: Int? = nil, timeout: TimeInterval = 60) {
            self.domain = domain
            self.uri = uri
            self.disk = disk
            self.repository = repository
            self.mode = mode
            self.compression = compression
            self.dryRun = dryRun
            self.clusterSize = clusterSize
            self.timeout = timeout
        }
    }

    /// The engine's result, why a full layer was taken (nil otherwise), and what else to say.
    public struct Outcome: Sendable {
        public var result: BackupEngine.Result
        public var reason: String?
        /// The checkpoint the layer records (nil: none).
        public var checkpoint: String?
        /// Routine things done besides the layer (informational: a shut-off domain read from its
        /// file, a checkpoint the repository did not need deleted).
        public var notes: [String]
        /// What the user should know of (a job or checkpoints an interrupted run or a crash left,
        /// a cleanup that failed, the next live backup being full).
        public var warnings: [String]
    }

    public static func backup(_ request: Request, logger: Logger = Logger(label: "qbackup.libvirt"),
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Outcome {
        let connection = try LibvirtConnection(uri: request.uri)
        defer { connection.close() }
        var engine = BackupEngine.Request(image: request.domain, repository: request.repository, mode: request.mode,
                                          compression: request.compression, dryRun: request.dryRun,
                                          clusterSize: request.clusterSize, takeOverBitmap: true)
        engine.tracking = .checkpoint(nil)
        if request.dryRun { return try dryRun(request, engine: engine, connection: connection) }

        let job = LiveJob(logger: logger)
        var plan: Plan?
        var continued: String?
        let result: BackupEngine.Result
        do {
            result = try BackupEngine.backup(engine, logger: logger, progress: progress) { repo, engineRequest in
                let target = try Target(request, connection: connection, repo: repo, engine: &engineRequest)
                if let old = target.offlineBitmap, let file = target.disk.file {
                    continued = "the repository continues from offline backups of \(file); its bitmap '\(old)' stays in that file (QEMU keeps it recording): remove it while the domain is shut off, with qbackup bitmap remove \(file) \(old)"
                }
                let settled = try target.isActive
                    ? try live(request, target: target, repo: repo, job: job, engine: &engineRequest)
                    : try offline(request, target: target, repo: repo, engine: &engineRequest)
                plan = settled
                return settled.source
            }
        } catch {
            job.finish(committed: plan?.committed ?? false)
            throw error
        }
        job.finish(committed: true)
        return Outcome(result: result, reason: plan?.reason, checkpoint: plan?.checkpoint,
                       notes: (plan?.notes ?? []) + job.notes,
                       warnings: (plan?.warnings ?? []) + job.warnings + (continued.map { [$0] } ?? []))
    }

    // MARK: - The domain and disk

    /// The domain and disk a backup is of, and what the repository knows of them.
    struct Target {
        let domain: LibvirtDomain
        let disk: LibvirtDomain.Disk
        let isActive: Bool
        /// The repository's id (a new repository's derived from its folder, as for QMP).
        let id: String
        let manifest: BackupManifest?
        /// The disk as the manifest records it: the domain's UUID, the disk target and the URI.
        let record: BackupManifest.Source
        /// The tracking bitmap of the offline repository this one continues (nil: none).
        let offlineBitmap: String?

        /// Finds the domain (the repository's UUID when the name is gone: a renamed domain is
        /// followed) and disk, and refuses a repository of another domain or disk before
        /// anything is changed.
        init(_ request: Request, connection: LibvirtConnection, repo: BackupRepository,
             engine: inout BackupEngine.Request) throws {
            manifest = repo.manifest
            let recorded = manifest?.source.kind == .libvirt ? manifest?.source.domainUUID : nil
            domain = try connection.domain(request.domain, recordedUUID: recorded)
            let disks = try domain.disks()
            if let wanted = request.disk {
                guard let found = disks.first(where: { $0.target == wanted }) else {
                    throw LiveError(.invalidArgument, "domain '\(domain.name)' has no disk '\(wanted)' (it has: \(disks.map(\.target).joined(separator: ", ")))")
                }
                disk = found
            } else {
                guard disks.count == 1, let only = disks.first else {
                    throw LiveError(.invalidArgument, disks.isEmpty ? "domain '\(domain.name)' has no disk"
                                    : "domain '\(domain.name)' has \(disks.count) disks (\(disks.map(\.target).joined(separator: ", "))); choose one with --disk")
                }
                disk = only
            }
            isActive = try domain.isActive()
            id = manifest?.id ?? QMPBackup.newRepositoryID(repo.path)
            record = BackupManifest.Source(kind: .libvirt, domainUUID: domain.uuid, disk: disk.target, uri: connection.uri)
            engine.source = record
            engine.repositoryID = id
            // An offline repository of this very disk file continues as a libvirt one (its
            // first libvirt layer is full: there is no checkpoint yet).
            if let m = manifest, m.source.kind == .file, !connection.isRemote, let file = disk.file,
               m.source == .localFile(file) {
                engine.continues = m.source
                offlineBitmap = m.bitmap
            } else {
                offlineBitmap = nil
            }
            // Another domain's (or disk's) repository is refused before a job or checkpoint exists.
            try BackupEngine.preflight(engine, repo: repo, virtualSize: .max)
        }

        /// This repository's checkpoints are `qbackup-<group>-<sequence>`.
        var checkpointPrefix: String { "qbackup-\(id)-" }
        /// The name the engine tracks changes by (the manifest records none for libvirt).
        var trackingName: String { "qbackup-\(id)" }
        /// The checkpoint the repository needs: the one its newest layer records.
        var needed: String? { manifest?.layers.last?.checkpoint }
        var hasChain: Bool { !(manifest?.layers.isEmpty ?? true) }
        var label: String { "\(domain.name)/\(disk.target)" }
    }

    /// What one backup does, once decided.
    final class Plan {
        let source: BackupSource
        let incremental: Bool
        let reason: String?
        let checkpoint: String?
        var notes: [String] = []
        var warnings: [String] = []
        init(source: BackupSource, incremental: Bool, reason: String?, checkpoint: String?) {
            self.source = source
            self.incremental = incremental
            self.reason = reason
            self.checkpoint = checkpoint
        }
        /// Whether the engine recorded the layer.
        var committed: Bool { (source as? NBDSource)?.committed ?? (source as? LibvirtOfflineSource)?.committed ?? false }
    }

    // MARK: - Running domain

    private static func live(_ request: Request, target: Target, repo: BackupRepository, job: LiveJob,
                             engine: inout BackupEngine.Request) throws -> Plan {
        let domain = target.domain
        job.domain = domain
        job.prefix = target.checkpointPrefix
        try job.takeOver(marker: target.checkpointPrefix)
        // Checkpoints of this repository that it does not need (left by a failed or killed run,
        // or older ones a run could not delete) cost every guest write: delete them, leaf first.
        var checkpoints = try domain.checkpoints()
        for cp in checkpoints.reversed() where cp.name.hasPrefix(target.checkpointPrefix) && cp.name != target.needed {
            try domain.deleteCheckpoint(cp.name)
            job.notes.append("deleted checkpoint '\(cp.name)' that the repository does not need")
        }
        checkpoints = try domain.checkpoints()
        let base = target.needed.flatMap { name in checkpoints.contains { $0.name == name } ? name : nil }

        var why: String?
        if request.mode == .full {
            why = "--full was asked for"
        } else if !target.hasChain {
            why = "the repository holds no backup yet"
        } else if target.offlineBitmap != nil || target.manifest?.source.kind == .file {
            why = "the repository's backups so far are offline ones of the disk file: there is no checkpoint yet"
        } else if let needed = target.needed, base == nil {
            why = "checkpoint '\(needed)' of the last layer is gone from libvirt, so changes since it are unknown"
        } else if base == nil {
            why = "the last layer was taken with the domain shut off and no checkpoint (changes since it are unknown)"
        }
        if request.mode == .incremental, let why {
            throw LiveError(.refused, "cannot take an incremental backup: \(why); only --full is allowed")
        }
        var incremental = why == nil
        let checkpoint = target.checkpointPrefix + String(target.manifest?.nextIndex ?? 0)

        // Locally a unix socket (and the scratch file) in a private folder beside the disk; for
        // another host, TCP on that host and the scratch file beside the disk there (qbackup
        // cannot make a folder on that host; libvirt creates the file and removes it with the
        // job). libvirt 9.0 needs the TCP port named: the first free one from 10809 (NBD's).
        let exportName = "\(target.checkpointPrefix)\(target.disk.target)"
        let host = domain.connection.host
        var port = Self.firstNBDPort
        var scratch: String
        var socket = ""
        if host != nil {
            guard let file = target.disk.file else {
                throw LiveError(.unsupported, "disk \(target.disk.target) is not a file; qbackup needs its folder for the backup's scratch file")
            }
            scratch = URL(fileURLWithPath: file).deletingLastPathComponent().path
                + "/.\(target.checkpointPrefix)scratch-\(target.disk.target).qcow2"
        } else {
            let dir = try job.privateFolder(near: target.disk, id: target.id)
            socket = dir + "/nbd.sock"
            scratch = dir + "/scratch-\(target.disk.target).qcow2"
        }
        func server() -> String {
            host.map { "<server transport='tcp' name='\(LibvirtXML.escape($0))' port='\(port)'/>" }
                ?? "<server transport='unix' socket='\(LibvirtXML.escape(socket))'/>"
        }
        let scratchXML = "<scratch file='\(LibvirtXML.escape(scratch))'/>"
        func backupXML(incremental: Bool) -> String { """
            <domainbackup mode='pull'>
              \(incremental ? "<incremental>\(LibvirtXML.escape(base ?? ""))</incremental>" : "")
              \(server())
              <disks>
                <disk name='\(LibvirtXML.escape(target.disk.target))' backup='yes' type='file' exportname='\(LibvirtXML.escape(exportName))'>
                  \(scratchXML)
                </disk>
              </disks>
            </domainbackup>
            """
        }
        let checkpointXML = """
            <domaincheckpoint>
              <name>\(LibvirtXML.escape(checkpoint))</name>
              <description>qbackup repository \(LibvirtXML.escape(repo.path))</description>
              <disks><disk name='\(LibvirtXML.escape(target.disk.target))' checkpoint='bitmap'/></disks>
            </domaincheckpoint>
            """
        /// Begins the job; over TCP, a port another server holds moves on to the next one.
        func begin(incremental: Bool) throws {
            while true {
                do {
                    return try domain.beginBackup(backupXML(incremental: incremental), checkpointXML: checkpointXML)
                } catch let error as LiveError where host != nil && error.message.contains("Address already in use")
                    && port < Self.firstNBDPort + Self.nbdPorts - 1 {
                    port += 1
                }
            }
        }
        do {
            try begin(incremental: incremental)
        } catch let error as LiveError where error.message.contains("inconsistent") || error.message.contains("broken bitmap") {
            // QEMU did not close the disk cleanly (it crashed): the checkpoints' bitmaps cannot be
            // trusted. libvirt's records go (leaf first, metadata only: deleting a damaged tree's
            // bitmaps can crash libvirtd 9.0); the bitmaps stay in QEMU (never raw QMP behind
            // libvirt's back) until a backup of the shut-off disk removes them; the layer is full.
            let stale = try LibvirtRecovery.dropCheckpoints(domain, prefix: target.checkpointPrefix)
            if request.mode == .incremental {
                throw LiveError(.refused, "cannot take an incremental backup: the checkpoints are inconsistent (\(error.message)); only --full is allowed")
            }
            incremental = false
            why = "the checkpoints were inconsistent (QEMU did not close the disk cleanly): \(error.message)"
            job.warnings.append("deleted the inconsistent checkpoint(s) \(stale.joined(separator: ", ")) (libvirt metadata only); their bitmaps stay in the running disk (qbackup sends no QMP behind libvirt's back) until a backup of the shut-off domain removes them")
            try begin(incremental: false)
        }
        job.started = true
        job.created = checkpoint
        #if DEBUG
        DebugHold.here()
        #endif

        engine.tracking = .checkpoint(checkpoint)
        engine.mode = incremental ? .incremental : .full
        let export: String
        if let host {
            export = "nbd://\(host.contains(":") ? "[\(host)]" : host):\(port)/\(exportName)"
        } else {
            export = "nbd+unix:///\(exportName)?socket=\(socket)"
        }
        let source = try NBDSource(uri: export, name: target.label,
                                   tracking: incremental
                                       ? NBDSource.Tracking(name: target.trackingName, exported: "backup-\(target.disk.target)")
                                       : nil,
                                   mode: .libvirt, timeout: request.timeout)
        source.disk = target.record
        return Plan(source: source, incremental: incremental, reason: why, checkpoint: checkpoint)
    }

    /// The TCP ports a remote job's NBD server may take: 10809 (NBD's) and the next ones.
    static let firstNBDPort = 10809
    static let nbdPorts = 64

    // MARK: - Shut-off domain

    private static func offline(_ request: Request, target: Target, repo: BackupRepository,
                                engine: inout BackupEngine.Request) throws -> Plan {
        let domain = target.domain
        if domain.connection.isRemote {
            throw LiveError(.refused, "domain '\(domain.name)' is shut off and its disk file is on the host of \(domain.connection.uri), not reachable from here; start the domain (paused is enough) for a live backup")
        }
        guard let file = target.disk.file, target.disk.format == nil || target.disk.format == "qcow2" else {
            throw LiveError(.unsupported, "domain '\(domain.name)' is shut off and its disk \(target.disk.target) is not a qcow2 file qbackup can read")
        }
        // The bitmaps of the last layer's checkpoint and of every checkpoint after it.
        let checkpoints = try domain.checkpoints()
        var names: [String] = []
        if let needed = target.needed, checkpoints.contains(where: { $0.name == needed }) {
            names = [needed]
            for cp in checkpoints where cp.parent.map(names.contains) ?? false { names.append(cp.name) }
        }
        var source = try LibvirtOfflineSource(path: file, name: target.label, disk: target.record, bitmaps: names,
                                              trackingName: target.trackingName)
        var why: String?
        if request.mode == .full {
            why = "--full was asked for"
        } else if !target.hasChain {
            why = "the repository holds no backup yet"
        } else if let needed = target.needed, names.isEmpty {
            why = "checkpoint '\(needed)' of the last layer is gone from libvirt, so changes since it are unknown"
        } else if target.needed == nil {
            why = "the last layer has no checkpoint, so changes since it are unknown"
        } else if let problem = source.problem {
            why = problem
        }
        if request.mode == .incremental, let why {
            source.close()
            throw LiveError(.refused, "cannot take an incremental backup: \(why); only --full is allowed")
        }
        var warnings: [String] = []
        if why != nil {
            // The chain starts again: checkpoints of this repository that cannot be trusted go
            // (metadata only: libvirt cannot delete a shut-off domain's bitmaps), and so do the
            // bitmaps they leave in the file, with qbackup's own bitmap code.
            source.close()
            let dropped = try LibvirtRecovery.dropCheckpoints(domain, prefix: target.checkpointPrefix)
            let removed = try LibvirtRecovery.removeStaleBitmaps(file, prefix: target.checkpointPrefix,
                                                                  keep: Set(try domain.checkpoints().map(\.name)))
            if !dropped.isEmpty { warnings.append("deleted checkpoint(s) \(dropped.joined(separator: ", ")) (libvirt metadata only)") }
            if !removed.isEmpty { warnings.append("removed stale bitmap(s) \(removed.joined(separator: ", ")) from \(file)") }
            source = try LibvirtOfflineSource(path: file, name: target.label, disk: target.record, bitmaps: [],
                                              trackingName: target.trackingName)
        }
        let incremental = why == nil
        // The checkpoint stays what it was: the next live backup starts from it.
        let checkpoint = incremental ? target.needed : nil
        engine.tracking = .checkpoint(checkpoint)
        engine.mode = incremental ? .incremental : .full
        engine.image = file
        let plan = Plan(source: source, incremental: incremental, reason: why, checkpoint: checkpoint)
        plan.notes = ["domain '\(domain.name)' is shut off: backed up from its disk file \(file)"]
        plan.warnings = warnings
        if checkpoint == nil { plan.warnings.append("no checkpoint could be made (domain '\(domain.name)' is shut off), so the next live backup is a full one") }
        return plan
    }

    // MARK: - Dry run

    private static func dryRun(_ request: Request, engine: BackupEngine.Request,
                               connection: LibvirtConnection) throws -> Outcome {
        let repo = try BackupRepository(path: request.repository, exclusive: false, allowMissing: true)
        var engine = engine
        let target = try Target(request, connection: connection, repo: repo, engine: &engine)
        let size = target.isActive ? try target.domain.capacity(of: target.disk.target) : 0
        let base = try target.needed.flatMap { name in try target.domain.checkpoints().contains { $0.name == name } ? name : nil }
        var why: String?
        if request.mode == .full { why = "--full was asked for" }
        else if !target.hasChain { why = "the repository holds no backup yet" }
        else if base == nil { why = "the last layer's checkpoint is not in libvirt, so changes since it are unknown" }
        if request.mode == .incremental, let why {
            throw LiveError(.refused, "cannot take an incremental backup: \(why); only --full is allowed")
        }
        let changed = base.flatMap { target.domain.changedSince($0, disk: target.disk.target) }
        let incremental = why == nil
        let result = BackupEngine.Result.dryRun(kind: incremental ? .incremental : .full,
                                                index: target.manifest?.nextIndex ?? 0, bitmap: target.trackingName,
                                                bytes: incremental ? changed ?? size : size, virtualSize: size)
        return Outcome(result: result, reason: why, checkpoint: base, notes: [], warnings: [])
    }
}

/// The libvirt side of one live backup: the job and checkpoint it made, and their cleanup.
final class LiveJob {
    let logger: Logger
    var domain: LibvirtDomain?
    var prefix = ""
    var started = false
    /// The checkpoint this run created (with the job).
    var created: String?
    var folder: String?
    /// Routine (a checkpoint the repository did not need, deleted).
    var notes: [String] = []
    /// What the user should know of (an interrupted run's job aborted, a cleanup that failed).
    var warnings: [String] = []

    init(logger: Logger) { self.logger = logger }

    /// A backup job already on the domain: one a killed run of this repository left (its
    /// export and checkpoints are named after `marker`) is aborted; any other is
    /// refused at once (exit 75), rather than waiting out libvirt's 30 s state lock.
    func takeOver(marker: String) throws {
        guard let domain, try domain.currentJob() != nil else { return }
        let xml = domain.backupXML() ?? ""
        guard xml.contains(marker) else {
            throw LiveError(.locked, "domain '\(domain.name)' is busy with another job (\(xml.isEmpty ? "not a backup" : "a backup qbackup did not start for this repository")); try again when it has finished")
        }
        try domain.abortJob()
        warnings.append("aborted the backup job an interrupted run of this repository left on domain '\(domain.name)'")
    }

    /// `.<prefix>d` beside the disk: the job's NBD socket and scratch file, owned by the user
    /// QEMU runs as (it creates the socket), mode 0700. What a killed run left there is removed.
    func privateFolder(near disk: LibvirtDomain.Disk, id: String) throws -> String {
        guard let domain, let file = disk.file else {
            throw LiveError(.unsupported, "disk \(disk.target) is not a file; qbackup needs a folder for the backup's socket")
        }
        let dir = URL(fileURLWithPath: file).deletingLastPathComponent().path + "/.\(prefix)d"
        guard dir.utf8.count + "/nbd.sock".utf8.count < 108 else {
            throw LiveError(.unsupported, "\(dir)/nbd.sock is too long for a unix socket path")
        }
        try? FileManager.default.removeItem(atPath: dir)
        guard mkdir(dir, 0o700) == 0 else {
            throw LiveError(.io, "cannot create \(dir): \(String(cString: strerror(errno)))")
        }
        folder = dir
        if let owner = try domain.qemuOwner(), chown(dir, owner.uid, owner.gid) != 0 {
            throw LiveError(.io, "cannot hand \(dir) to QEMU's user \(owner.uid):\(owner.gid): \(String(cString: strerror(errno)))")
        }
        return dir
    }

    /// Ends the job once every read is done, then settles the checkpoints: after a committed
    /// layer, every other checkpoint of the repository goes (leaf first); otherwise the one this
    /// run created, so that the next incremental starts from the last layer's checkpoint.
    func finish(committed: Bool) {
        defer {
            if let folder { try? FileManager.default.removeItem(atPath: folder) }
        }
        guard let domain, started else { return }
        do {
            let stats = try domain.abortJob()
            logger.info("backup job ended", metadata: stats.mapValues { "\($0)" })
        } catch {
            warnings.append("ending the backup job failed (the next backup aborts it): \(error)")
        }
        do {
            if committed {
                for cp in try domain.checkpoints().reversed() where cp.name.hasPrefix(prefix) && cp.name != created {
                    try domain.deleteCheckpoint(cp.name)
                }
            } else if let created {
                try domain.deleteCheckpoint(created)
            }
        } catch {
            warnings.append("deleting checkpoints failed (the next backup deletes what the repository does not need): \(error)")
        }
        for note in notes + warnings { logger.info("\(note)") }
    }
}

/// Recovery after QEMU did not close a disk cleanly (live-backup.md part 2 §5.5).
enum LibvirtRecovery {
    /// Deletes libvirt's records of this repository's checkpoints, one at a time, leaf first,
    /// metadata only (`--children` on a damaged tree crashed libvirtd 9.0). Returns their names.
    static func dropCheckpoints(_ domain: LibvirtDomain, prefix: String) throws -> [String] {
        var dropped: [String] = []
        for cp in try domain.checkpoints().reversed() where cp.name.hasPrefix(prefix) {
            try domain.deleteCheckpoint(cp.name, metadataOnly: true)
            dropped.append(cp.name)
        }
        return dropped
    }

    /// Removes from the (shut-off) disk file the bitmaps of this repository's checkpoints that
    /// libvirt no longer has (`keep`: the checkpoints it has). Returns their names.
    static func removeStaleBitmaps(_ file: String, prefix: String, keep: Set<String>) throws -> [String] {
        let image = try ImageOpener.open(file, writable: true)
        defer { image.close() }
        guard let qcow = image as? QCowFile else { return [] }
        let catalog = try BitmapCatalog(file: qcow)
        let stale = catalog.entries.map { String(decoding: $0.nameBytes, as: UTF8.self) }
            .filter { $0.hasPrefix(prefix) && !keep.contains($0) }
        for name in stale { try catalog.remove(name) }
        return stale
    }
}
