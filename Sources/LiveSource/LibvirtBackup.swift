import BackupChain
import BitmapStore
import FoundationEssentials
import Glibc
import Logging
import QCowImage

/// `qbackup backup --libvirt DOMAIN`: the disks of a VM that libvirt manages, through
/// libvirt's own API (never QMP behind its back): checkpoints and pull-mode backup.
///
/// Layout: a run of one disk uses DIR (`--repo`) as that disk's repository; a run of several
/// (`--disk` repeated, or every file-backed disk of the domain) keeps one repository per disk
/// in DIR (DIR/vda, DIR/vdb) and the group's checkpoint record at DIR's top (LibvirtGroup).
///
/// A running domain: ONE `virDomainBackupBegin` for every disk of the run creates checkpoint
/// `qbackup-<group>-<sequence>` (naming them all) atomically with a point-in-time NBD export of
/// each disk, so all layers of a run are of one moment; each disk is full or incremental from
/// its own repository's last checkpoint (libvirt's per-disk `backupmode`/`incremental`). Every
/// read goes through `NBDSource`; no layer is recorded unless every disk's layer was written;
/// the job is aborted (the normal end of a pull job) only once every disk's engine is done
/// with its export. Then the checkpoints of the group that no repository of it needs are
/// deleted (each one costs every guest write); when no layer was recorded, the checkpoint the
/// job created instead.
///
/// A shut-off domain: each layer is read from its disk file, the changes from the union of the
/// checkpoint bitmaps from its repository's last checkpoint on; no checkpoint is created and
/// the layer records that same one, so the next live backup starts from it.
public enum LibvirtBackup {
    public struct Request: Sendable {
        public var domain: String
        public var uri: String
        /// The disk targets (`vda`, …); empty: every file-backed disk of the domain.
        public var disks: [String]
        /// DIR: the repository of one disk, or the folder of one repository per disk.
        public var repository: String
        public var mode: BackupEngine.Mode
        public var compression: CompressionType?
        public var dryRun: Bool
        public var clusterSize: Int?
        /// How long each NBD request may take.
        public var timeout: TimeInterval
        public init(domain: String, uri: String = "qemu:///system", disks: [String] = [], repository: String,
                    mode: BackupEngine.Mode = .auto, compression: CompressionType? = nil, dryRun: Bool = false,
                    clusterSize: Int? = nil, timeout: TimeInterval = 60) {
            self.domain = domain
            self.uri = uri
            self.disks = disks
            self.repository = repository
            self.mode = mode
            self.compression = compression
            self.dryRun = dryRun
            self.clusterSize = clusterSize
            self.timeout = timeout
        }
    }

    /// What the run did for one disk: the engine's result, why a full layer was taken (nil
    /// otherwise) and the checkpoint the layer records (nil: none).
    public struct DiskOutcome: Sendable {
        public var target: String
        /// The disk's repository: DIR itself, or DIR/TARGET.
        public var repository: String
        public var result: BackupEngine.Result
        public var reason: String?
        public var checkpoint: String?
    }

    public struct Outcome: Sendable {
        /// One per disk, in the order of the run (`--disk` as given, else the domain's).
        public var disks: [DiskOutcome]
        /// DIR holds one repository per disk (DIR/TARGET), rather than being the disk's repository.
        public var grouped: Bool
        /// Routine things done besides the layers (informational: a shut-off domain read from
        /// its files, a checkpoint no repository needed deleted).
        public var notes: [String]
        /// What the user should know of (a job or checkpoints an interrupted run or a crash left,
        /// a cleanup that failed, the next live backup being full).
        public var warnings: [String]
    }

    public static func backup(_ request: Request, logger: Logger = Logger(label: "qbackup.libvirt"),
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Outcome {
        let connection = try LibvirtConnection(uri: request.uri)
        defer { connection.close() }
        var layout = try Layout(request, connection: connection)
        if request.dryRun { return try dryRun(request, layout: layout) }
        guard layout.grouped else { return try DiskRuns(request, layout: layout, logger: logger, progress: progress).run() }
        // The top folder of a group is locked for the whole run (as a repository is), so two
        // runs of one group never overlap; each disk's repository is locked by its engine.
        let top = try BackupRepository(path: layout.top, create: true, exclusive: true, groupTop: true)
        var recorded = false
        do {
            // Read again under the lock (another run may have been first), and recorded from the
            // start: DIR is a group's from now on, whatever the run does.
            if top.manifest != nil {
                throw LiveError(.refused, "\(layout.top) became the repository of one disk meanwhile (another qbackup?); try again")
            }
            if let record = try LibvirtGroup.load(layout.top) {
                recorded = true
                if let uuid = record.domainUUID, uuid != layout.domain.uuid {
                    throw LiveError(.refused, "\(layout.top) holds the repositories of another domain (UUID \(uuid)), not of '\(layout.domain.name)' (\(layout.domain.uuid))")
                }
                layout.group = record
            } else {
                try layout.group?.save(layout.top)
            }
            return try DiskRuns(request, layout: layout, logger: logger, progress: progress).run()
        } catch {
            // A new group whose first run made no repository leaves nothing behind.
            let repositories = layout.disks.filter { FileManager.default.fileExists(atPath: "\(layout.repository(of: $0))/\(BackupManifest.fileName)") }
            if !recorded && repositories.isEmpty { unlink(LibvirtGroup.path(in: layout.top)) }
            top.removeIfUnused()
            throw error
        }
    }

    // MARK: - The domain, its disks and where their repositories are

    /// The domain, the disks a run backs up, and the layout of DIR.
    struct Layout {
        let domain: LibvirtDomain
        /// In the order of the run: `--disk` as given, else the domain's own.
        let disks: [LibvirtDomain.Disk]
        /// DIR holds one repository per disk and the group record; otherwise DIR is the disk's repository.
        let grouped: Bool
        /// DIR.
        let top: String
        /// The group record (grouped only: the one in DIR, or a new group's); one disk's
        /// repository is its own record (its id and next layer index).
        var group: LibvirtGroup?

        func repository(of disk: LibvirtDomain.Disk) -> String { grouped ? "\(top)/\(disk.target)" : top }

        /// Finds the domain (the recorded UUID when the name is gone: a renamed domain is
        /// followed) and its disks, and decides the layout — refusing, before anything is
        /// written, several disks for a DIR that is one disk's repository.
        init(_ request: Request, connection: LibvirtConnection) throws {
            let top = request.repository
            self.top = top
            let record = try LibvirtGroup.load(top)
            let single = FileManager.default.fileExists(atPath: "\(top)/\(BackupManifest.fileName)")
            if single && record != nil {
                throw LiveError(.refused, "\(top) holds both a repository (\(BackupManifest.fileName)) and the record of a group of disk repositories (\(LibvirtGroup.fileName)); qbackup does not know which one it is")
            }
            var recorded = record?.domainUUID
            if single {
                // Only to follow a renamed domain: the engine reads the manifest again under its lock.
                let peek = try BackupRepository(path: top, exclusive: false, createLock: false)
                if let m = peek.manifest, m.source.kind == .libvirt { recorded = m.source.domainUUID }
            }
            let domain = try connection.domain(request.domain, recordedUUID: recorded)
            self.domain = domain
            if let uuid = record?.domainUUID, uuid != domain.uuid {
                throw LiveError(.refused, "\(top) holds the repositories of another domain (UUID \(uuid)), not of '\(domain.name)' (\(domain.uuid))")
            }
            let all = try domain.disks()
            var chosen: [LibvirtDomain.Disk] = []
            if request.disks.isEmpty {
                chosen = all.filter { $0.file != nil }
                if chosen.isEmpty {
                    throw LiveError(.invalidArgument, all.isEmpty ? "domain '\(domain.name)' has no disk"
                                    : "domain '\(domain.name)' has no disk backed by a file or block device (\(all.map(\.target).joined(separator: ", ")))")
                }
            } else {
                for wanted in request.disks {
                    guard let found = all.first(where: { $0.target == wanted }) else {
                        throw LiveError(.invalidArgument, "domain '\(domain.name)' has no disk '\(wanted)' (it has: \(all.map(\.target).joined(separator: ", ")))")
                    }
                    if !chosen.contains(found) { chosen.append(found) }
                }
            }
            disks = chosen
            if single && chosen.count > 1 {
                throw LiveError(.refused, "\(top) is the repository of one disk; it cannot take several (\(chosen.map(\.target).joined(separator: ", "))): back up that disk alone with --disk, or the several disks into a new --repo (one repository per disk in it)")
            }
            let grouped = record != nil || (!single && chosen.count > 1)
            self.grouped = grouped
            group = grouped ? record ?? LibvirtGroup(id: QMPBackup.newRepositoryID(top), domainUUID: domain.uuid, sequence: 0) : nil
        }
    }

    /// One disk of a run, and what its repository knows of it.
    struct Target {
        let domain: LibvirtDomain
        let disk: LibvirtDomain.Disk
        /// The repository's id (a new repository's derived from its folder, as for QMP).
        let id: String
        let manifest: BackupManifest?
        /// The disk as the manifest records it: the domain's UUID, the disk target and the URI.
        let record: BackupManifest.Source
        /// The tracking bitmap of the offline repository this one continues (nil: none).
        let offlineBitmap: String?
        /// The checkpoints of the repository's group are `qbackup-<group>-<sequence>` (one
        /// disk's repository is its own group: its id).
        let checkpointPrefix: String
        /// The run is of a group (DIR/TARGET): messages name the disk.
        let grouped: Bool

        /// Refuses a repository of another domain or disk before anything is changed (`repo`
        /// is open and locked by the engine).
        init(_ request: Request, layout: Layout, disk: LibvirtDomain.Disk, repo: BackupRepository,
             engine: inout BackupEngine.Request) throws {
            let manifest = repo.manifest
            self.manifest = manifest
            domain = layout.domain
            self.disk = disk
            let id = manifest?.id ?? QMPBackup.newRepositoryID(repo.path)
            self.id = id
            checkpointPrefix = layout.group?.checkpointPrefix ?? "qbackup-\(id)-"
            grouped = layout.grouped
            let connection = layout.domain.connection
            let record = BackupManifest.Source(kind: .libvirt, domainUUID: layout.domain.uuid, disk: disk.target,
                                               uri: connection.uri)
            self.record = record
            engine.source = record
            engine.repositoryID = id
            if !layout.grouped && FileManager.default.fileExists(atPath: LibvirtGroup.path(in: repo.path)) {
                throw LiveError(.refused, "\(repo.path) became the folder of a group of disk repositories meanwhile (another qbackup?); try again")
            }
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

        /// The name the engine tracks changes by (the manifest records none for libvirt).
        var trackingName: String { "qbackup-\(id)" }
        /// The checkpoint the repository needs: the one its newest layer records.
        var needed: String? { manifest?.layers.last?.checkpoint }
        var hasChain: Bool { !(manifest?.layers.isEmpty ?? true) }
        var label: String { "\(domain.name)/\(disk.target)" }
        /// The warning for an offline repository continued as a libvirt one.
        var continued: String? {
            guard let old = offlineBitmap, let file = disk.file else { return nil }
            return "the repository continues from offline backups of \(file); its bitmap '\(old)' stays in that file (QEMU keeps it recording): remove it while the domain is shut off, with qbackup bitmap remove \(file) \(old)"
        }
    }

    /// What one disk's backup does, once decided: the source and how the engine is to run.
    final class Plan {
        let source: BackupSource
        let incremental: Bool
        let reason: String?
        let checkpoint: String?
        /// The engine's image (the disk file of a shut-off domain; nil: the domain's name).
        var image: String?
        var notes: [String] = []
        var warnings: [String] = []
        init(source: BackupSource, incremental: Bool, reason: String?, checkpoint: String?) {
            self.source = source
            self.incremental = incremental
            self.reason = reason
            self.checkpoint = checkpoint
        }
    }

    /// The checkpoints that the group's repositories outside this run need (those in DIR of
    /// disks not backed up now): nil when one of them cannot be read (nothing of the group is
    /// then deleted but what this run made and nobody needs).
    static func neededOutside(_ layout: Layout, targets: [Target]) -> Set<String>? {
        guard layout.grouped else { return [] }
        let inRun = Set(targets.map(\.disk.target))
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: layout.top) else { return nil }
        var needed: Set<String> = []
        for name in names where !inRun.contains(name) && !name.hasPrefix(".") {
            let path = "\(layout.top)/\(name)"
            guard FileManager.default.fileExists(atPath: "\(path)/\(BackupManifest.fileName)") else { continue }
            guard let repo = try? BackupRepository(path: path, exclusive: false, createLock: false), let m = repo.manifest else {
                return nil
            }
            if m.source.kind == .libvirt, m.source.domainUUID == layout.domain.uuid, let cp = m.layers.last?.checkpoint {
                needed.insert(cp)
            }
        }
        return needed
    }

    // MARK: - Running domain

    /// Begins ONE job for every disk of the run and returns each disk's plan (its NBD export).
    static func live(_ request: Request, layout: Layout, targets: [Target], outside: Set<String>?,
                     job: LiveJob) throws -> [Plan] {
        let domain = layout.domain
        guard let first = targets.first else { return [] }
        let prefix = first.checkpointPrefix
        job.domain = domain
        job.prefix = prefix
        try job.takeOver(marker: prefix)
        // Checkpoints of the group that no repository of it needs (left by a failed or killed
        // run, or older ones a run could not delete) cost every guest write: delete them, leaf
        // first. (Not knowing what a repository outside the run needs, none is deleted.)
        var checkpoints = try domain.checkpoints()
        if let outside {
            let needed = outside.union(targets.compactMap(\.needed))
            for cp in checkpoints.reversed() where cp.name.hasPrefix(prefix) && !needed.contains(cp.name) {
                try domain.deleteCheckpoint(cp.name)
                job.notes.append("deleted checkpoint '\(cp.name)' that \(layout.grouped ? "no repository of the group needs" : "the repository does not need")")
            }
            checkpoints = try domain.checkpoints()
        }
        let present = Set(checkpoints.map(\.name))

        // Each disk incremental from its own repository's last checkpoint, when it can be.
        var whys: [String?] = targets.map { (target: Target) -> String? in
            if request.mode == .full { return "--full was asked for" }
            if !target.hasChain { return "the repository holds no backup yet" }
            if target.offlineBitmap != nil || target.manifest?.source.kind == .file {
                return "the repository's backups so far are offline ones of the disk file: there is no checkpoint yet"
            }
            if let needed = target.needed, !present.contains(needed) {
                return "checkpoint '\(needed)' of the last layer is gone from libvirt, so changes since it are unknown"
            }
            if target.needed == nil {
                return "the last layer was taken with the domain shut off and no checkpoint (changes since it are unknown)"
            }
            return nil
        }
        func refuseIncremental(_ why: String, _ target: Target) -> LiveError {
            LiveError(.refused, "cannot take an incremental backup\(layout.grouped ? " of disk \(target.disk.target)" : ""): \(why); only --full is allowed")
        }
        if request.mode == .incremental, let i = whys.firstIndex(where: { $0 != nil }), let why = whys[i] {
            throw refuseIncremental(why, targets[i])
        }
        var incremental = whys.map { $0 == nil }

        // The checkpoint's name: a group's next sequence, recorded before the job begins (so
        // no later job reuses it) and past every one of the group's checkpoints the domain has;
        // one disk's repository: its next layer index, as it always was.
        let checkpoint: String
        if var group = layout.group {
            let highest = checkpoints.compactMap { $0.name.hasPrefix(prefix) ? Int($0.name.dropFirst(prefix.count)) : nil }.max()
            group.sequence = max(group.sequence, (highest ?? -1) + 1)
            checkpoint = group.nextCheckpoint
            group.sequence += 1
            try group.save(layout.top)
        } else {
            checkpoint = prefix + String(first.manifest?.nextIndex ?? 0)
        }

        // Locally a unix socket (and the scratch files) in a private folder beside the first
        // disk; for another host, TCP on that host and each scratch file beside its disk there
        // (qbackup cannot make a folder on that host; libvirt creates the files and removes
        // them with the job). libvirt 9.0 needs the TCP port named: the first free one from
        // 10809 (NBD's). One NBD server per job: every disk's export is on it.
        let host = domain.connection.host
        var port = Self.firstNBDPort
        var socket = ""
        var scratch: [String] = []
        if host != nil {
            for target in targets {
                guard let file = target.disk.file else {
                    throw LiveError(.unsupported, "disk \(target.disk.target) is not a file; qbackup needs its folder for the backup's scratch file")
                }
                scratch.append(URL(fileURLWithPath: file).deletingLastPathComponent().path
                               + "/.\(prefix)scratch-\(target.disk.target).qcow2")
            }
        } else {
            let dir = try job.privateFolder(near: first.disk)
            socket = dir + "/nbd.sock"
            scratch = targets.map { dir + "/scratch-\($0.disk.target).qcow2" }
        }
        func exportName(_ target: Target) -> String { "\(prefix)\(target.disk.target)" }
        func server() -> String {
            host.map { "<server transport='tcp' name='\(LibvirtXML.escape($0))' port='\(port)'/>" }
                ?? "<server transport='unix' socket='\(LibvirtXML.escape(socket))'/>"
        }
        // libvirt 9.0's per-disk `backupmode` and `incremental` (domainbackup.rng): a disk whose
        // repository has no usable checkpoint is full while the others go on incrementally.
        func backupXML() -> String {
            let disks = targets.indices.map { i in
                let target = targets[i]
                let mode = incremental[i] ? "backupmode='incremental' incremental='\(LibvirtXML.escape(target.needed ?? ""))'"
                    : "backupmode='full'"
                return """
                    <disk name='\(LibvirtXML.escape(target.disk.target))' backup='yes' type='file' \(mode) exportname='\(LibvirtXML.escape(exportName(target)))'>
                      <scratch file='\(LibvirtXML.escape(scratch[i]))'/>
                    </disk>
                """
            }
            return """
                <domainbackup mode='pull'>
                  \(server())
                  <disks>
                \(disks.joined(separator: "\n"))
                  </disks>
                </domainbackup>
                """
        }
        let checkpointDisks = targets.map { "<disk name='\(LibvirtXML.escape($0.disk.target))' checkpoint='bitmap'/>" }
        let checkpointXML = """
            <domaincheckpoint>
              <name>\(LibvirtXML.escape(checkpoint))</name>
              <description>qbackup repository \(LibvirtXML.escape(layout.top))</description>
              <disks>\(checkpointDisks.joined())</disks>
            </domaincheckpoint>
            """
        /// Begins the job; over TCP, a port another server holds moves on to the next one.
        func begin() throws {
            while true {
                do {
                    return try domain.beginBackup(backupXML(), checkpointXML: checkpointXML)
                } catch let error as LiveError where host != nil && error.message.contains("Address already in use")
                    && port < Self.firstNBDPort + Self.nbdPorts - 1 {
                    port += 1
                }
            }
        }
        do {
            try begin()
        } catch let error as LiveError where error.message.contains("inconsistent") || error.message.contains("broken bitmap") {
            // QEMU did not close the disks cleanly (it crashed): the checkpoints' bitmaps cannot
            // be trusted. libvirt's records go (leaf first, metadata only: deleting a damaged
            // tree's bitmaps can crash libvirtd 9.0); the bitmaps stay in QEMU (never raw QMP
            // behind libvirt's back) until a backup of the shut-off disks removes them; every
            // layer is full.
            let stale = try LibvirtRecovery.dropCheckpoints(domain, prefix: prefix)
            let why = "the checkpoints were inconsistent (QEMU did not close the disk cleanly): \(error.message)"
            if request.mode == .incremental { throw refuseIncremental(why, first) }
            for i in targets.indices where incremental[i] { whys[i] = why }
            incremental = targets.map { _ in false }
            job.warnings.append("deleted the inconsistent checkpoint(s) \(stale.joined(separator: ", ")) (libvirt metadata only); their bitmaps stay in the running disk (qbackup sends no QMP behind libvirt's back) until a backup of the shut-off domain removes them")
            try begin()
        }
        job.started = true
        job.created = checkpoint
        #if DEBUG
        DebugHold.here()
        #endif

        var plans: [Plan] = []
        do {
            for (i, target) in targets.enumerated() {
                let name = exportName(target)
                let export: String
                if let host {
                    export = "nbd://\(host.contains(":") ? "[\(host)]" : host):\(port)/\(name)"
                } else {
                    export = "nbd+unix:///\(name)?socket=\(socket)"
                }
                let source = try NBDSource(uri: export, name: target.label,
                                           tracking: incremental[i]
                                               ? NBDSource.Tracking(name: target.trackingName, exported: "backup-\(target.disk.target)")
                                               : nil,
                                           mode: .libvirt, timeout: request.timeout)
                source.disk = target.record
                plans.append(Plan(source: source, incremental: incremental[i], reason: whys[i], checkpoint: checkpoint))
            }
        } catch {
            for plan in plans { plan.source.close() }
            throw error
        }
        return plans
    }

    /// The TCP ports a remote job's NBD server may take: 10809 (NBD's) and the next ones.
    static let firstNBDPort = 10809
    static let nbdPorts = 64

    // MARK: - Shut-off domain

    /// One disk of a shut-off domain, read from its file.
    static func offline(_ request: Request, target: Target) throws -> Plan {
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
            throw LiveError(.refused, "cannot take an incremental backup\(target.grouped ? " of disk \(target.disk.target)" : ""): \(why); only --full is allowed")
        }
        var warnings: [String] = []
        if why != nil {
            // This disk's chain starts again. Checkpoints whose bitmaps in the file cannot be
            // trusted (inconsistent after a crash) go (metadata only: libvirt cannot delete a
            // shut-off domain's bitmaps); so do the bitmaps of checkpoints libvirt no longer
            // has, from the file, with qbackup's own bitmap code. Checkpoints that are fine
            // stay: other disks' repositories of the group may need them.
            source.close()
            var dropped: [String] = []
            if source.problem != nil { dropped = try LibvirtRecovery.dropCheckpoints(domain, prefix: target.checkpointPrefix) }
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
        let plan = Plan(source: source, incremental: incremental, reason: why, checkpoint: checkpoint)
        plan.image = file
        plan.notes = ["domain '\(domain.name)' is shut off: backed up from its disk file \(file)"]
        plan.warnings = warnings
        if checkpoint == nil { plan.warnings.append("no checkpoint could be made (domain '\(domain.name)' is shut off), so the next live backup is a full one") }
        return plan
    }

    // MARK: - Dry run

    private static func dryRun(_ request: Request, layout: Layout) throws -> Outcome {
        let active = try layout.domain.isActive()
        let checkpoints = Set(try layout.domain.checkpoints().map(\.name))
        var disks: [DiskOutcome] = []
        for disk in layout.disks {
            let repo = try BackupRepository(path: layout.repository(of: disk), exclusive: false, allowMissing: true)
            var engine = BackupEngine.Request(image: request.domain, repository: repo.path, mode: request.mode,
                                              compression: request.compression, dryRun: true,
                                              clusterSize: request.clusterSize, takeOverBitmap: true)
            engine.tracking = .checkpoint(nil)
            let target = try Target(request, layout: layout, disk: disk, repo: repo, engine: &engine)
            let size = active ? try layout.domain.capacity(of: disk.target) : 0
            let base = target.needed.flatMap { checkpoints.contains($0) ? $0 : nil }
            var why: String?
            if request.mode == .full { why = "--full was asked for" }
            else if !target.hasChain { why = "the repository holds no backup yet" }
            else if base == nil { why = "the last layer's checkpoint is not in libvirt, so changes since it are unknown" }
            if request.mode == .incremental, let why {
                throw LiveError(.refused, "cannot take an incremental backup\(layout.grouped ? " of disk \(disk.target)" : ""): \(why); only --full is allowed")
            }
            let changed = base.flatMap { layout.domain.changedSince($0, disk: disk.target) }
            let incremental = why == nil
            let result = BackupEngine.Result.dryRun(kind: incremental ? .incremental : .full,
                                                    index: target.manifest?.nextIndex ?? 0, bitmap: target.trackingName,
                                                    bytes: incremental ? changed ?? size : size, virtualSize: size)
            disks.append(DiskOutcome(target: disk.target, repository: repo.path, result: result, reason: why, checkpoint: base))
        }
        return Outcome(disks: disks, grouped: layout.grouped, notes: [], warnings: [])
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
    func privateFolder(near disk: LibvirtDomain.Disk) throws -> String {
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

    /// Ends the job once every read is done, then settles the checkpoints: after a recorded
    /// layer, every checkpoint of the group that is not in `keep` (what the group's
    /// repositories need) goes, leaf first (nil: what they need is not known, so none goes);
    /// when no layer was recorded, the one this run created, so that each disk's next
    /// incremental starts from its last layer's checkpoint.
    func finish(committed: Bool, keep: Set<String>?) {
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
                if let keep {
                    for cp in try domain.checkpoints().reversed() where cp.name.hasPrefix(prefix) && !keep.contains(cp.name) {
                        try domain.deleteCheckpoint(cp.name)
                    }
                }
            } else if let created {
                try domain.deleteCheckpoint(created)
            }
        } catch {
            warnings.append("deleting checkpoints failed (the next backup deletes what the repositories do not need): \(error)")
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
