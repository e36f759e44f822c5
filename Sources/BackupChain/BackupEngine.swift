import BitmapStore
import FoundationEssentials
import Glibc
import Logging
import QCowImage

/// Nightly backups: a full layer, or an incremental layer of exactly the
/// ranges the tracking bitmap marks dirty, on top of the repository's chain.
///
/// Order for durability (a kill at any moment loses no change):
/// 1. the names about to be created are journaled in the manifest; the layer is written
///    under `NAME.partial` and fsynced;
/// 2. renamed to NAME, directory fsynced;
/// 3. the layer's sidecar is written, then the manifest is replaced atomically (temp, fsync,
///    rename, directory fsync) listing the layer, its names out of the journal;
/// 4. only then is the bitmap reset in the source image.
/// Dying before 3 leaves the manifest as it was and the bitmap still holding
/// every change (the next run removes the journaled leftovers); dying between 3 and 4
/// leaves extra dirty bits, so the next incremental copies a little more.
public enum BackupEngine {
    public enum Mode: String, Sendable { case auto, full, incremental }

    public struct Request: Sendable {
        public var image: String
        public var repository: String
        public var bitmap: String?
        public var mode: Mode
        public var compression: CompressionType?
        public var dryRun: Bool
        /// Cluster size of layers in a new repository (later layers keep the repository's).
        public var clusterSize: Int?
        /// A new repository may use a `bitmap` that already exists in the image (it may be
        /// another repository's: taking it over resets it, and that repository misses changes).
        public var takeOverBitmap: Bool
        /// What the manifest records as the disk, when the caller names it otherwise than the
        /// source does (default: the source's `disk`).
        public var source: BackupManifest.Source?
        /// The id of a new repository (a live backup names QEMU objects after it before the
        /// repository is created); default: a random one.
        public var repositoryID: String? = nil
        /// How the source tracks changes: its dirty bitmap, or (libvirt) checkpoints, where the
        /// manifest names no bitmap and the layer records the checkpoint it began (if any).
        public var tracking: Tracking = .bitmap
        /// The repository's recorded source that this one may continue (an offline repository
        /// of the same disk file continuing as a libvirt one): its next layer must be full, and
        /// from it on the manifest records the new source (and, tracking checkpoints, no bitmap).
        public var continues: BackupManifest.Source? = nil
        public init(image: String, repository: String, bitmap: String? = nil, mode: Mode = .auto,
                    compression: CompressionType? = nil, dryRun: Bool = false, clusterSize: Int? = nil,
                    takeOverBitmap: Bool = false) {
            self.takeOverBitmap = takeOverBitmap
            self.image = image
            self.repository = repository
            self.bitmap = bitmap
            self.mode = mode
            self.compression = compression
            self.dryRun = dryRun
            self.clusterSize = clusterSize
        }

        /// Refuses arguments that no backup could use (that could only fail later, after the
        /// disk was copied), before anything is opened or created.
        public func validate() throws {
            if let clusterSize { try QCowCreator.validateClusterSize(clusterSize) }
            if let bitmap, let problem = BitmapLimits.problem(withNewName: bitmap) {
                throw ChainError(.invalidArgument, "--bitmap: \(problem)")
            }
        }
    }

    public enum Tracking: Equatable, Sendable {
        case bitmap
        case checkpoint(String?)

        var checkpoint: String? {
            if case .checkpoint(let name) = self { return name }
            return nil
        }
    }

    public struct Result: Sendable {
        public var kind: BackupManifest.Layer.Kind
        /// The new layer (nil on a dry run).
        public var layer: BackupManifest.Layer?
        public var index: Int
        public var bitmap: String
        public var bytesCopied: UInt64
        /// Ranges that were (or on a dry run would be) copied.
        public var extents: Int
        public var dryRun: Bool
        public var virtualSize: UInt64
        /// Why a full layer was taken when an incremental one was asked for by auto mode.
        public var reason: String?
    }

    /// Runs one backup of `request.image` into `request.repository`. The request is validated
    /// before anything is opened or read. A first backup that fails leaves no repository folder
    /// (nor manifest) behind.
    public static func backup(_ request: Request, logger: Logger = Logger(label: "qbackup.backup"),
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        try backup(request, logger: logger, progress: progress) { repo, request in
            let source = try LocalImageSource(path: request.image, writable: !request.dryRun)
            if !request.dryRun, let name = repo.manifest?.bitmap ?? request.bitmap {
                do { try source.mergeBackFrozen(name) } catch {
                    source.close()
                    throw error
                }
            }
            return source
        }
    }

    /// Runs one backup from the source that `open` returns, once the repository is open,
    /// locked and recovered (a live source sets QEMU up only then, and may settle the
    /// request's mode and bitmap from what it found). The source is closed before this
    /// returns; `request.source` identifies it in the manifest.
    public static func backup(_ request: Request, logger: Logger, progress: ((UInt64, UInt64) -> Void)?,
                              open: (BackupRepository, inout Request) throws -> BackupSource) throws -> Result {
        try request.validate()
        let repo = try BackupRepository(path: request.repository, create: !request.dryRun, exclusive: !request.dryRun,
                                        allowMissing: request.dryRun)
        do {
            try repo.refuseReplica("backup")
            if !request.dryRun {
                try repo.requireIntact()
                try MergeEngine.recover(repo, logger: logger)
                try repo.removeLeftovers()
            }
            var request = request
            let source = try open(repo, &request)
            defer { source.close() }
            return try backup(request, repo: repo, source: source, logger: logger, progress: progress)
        } catch {
            repo.removeIfUnused()
            throw error
        }
    }

    /// The checks that refuse a backup into this repository before anything is read or
    /// changed (a live source runs them before it sets QEMU up): the repository's disk
    /// (`disk`, as the source names it; before a source exists, the local image
    /// `request.image`), its bitmap, and a disk that shrank. Returns the disk as the
    /// manifest records it.
    @discardableResult
    public static func preflight(_ request: Request, repo: BackupRepository, virtualSize: UInt64,
                                 disk: BackupManifest.Source? = nil) throws -> BackupManifest.Source
    {
        let sourceRecord = request.source ?? disk ?? .localFile(request.image)
        if let m = repo.manifest {
            if m.source != sourceRecord && m.source != request.continues {
                throw ChainError(.refused, "the repository belongs to another disk (\(m.source.summary)), not \(sourceRecord.summary)",
                                 path: repo.path)
            }
            if let name = request.bitmap, name != m.bitmap {
                throw ChainError(.refused, "the repository tracks changes with bitmap '\(m.bitmap ?? "none")', not '\(name)'",
                                 path: repo.path)
            }
            if virtualSize < m.virtualSize {
                throw ChainError(.refused, "the disk shrank from \(m.virtualSize) to \(virtualSize) bytes since the last backup; start a new repository",
                                 path: repo.path)
            }
        }
        return sourceRecord
    }

    /// The engine proper, on any `BackupSource`.
    public static func backup(_ request: Request, repo: BackupRepository, source: BackupSource, logger: Logger,
                              progress: ((UInt64, UInt64) -> Void)?) throws -> Result {
        try request.validate()
        var existing = repo.manifest
        let sourceRecord = try preflight(request, repo: repo, virtualSize: source.virtualSize, disk: source.disk)
        // A version 1 repository: each layer hashed once (a damaged one is marked, never trusted).
        if let m = existing, m.version == 1, !request.dryRun { existing = try repo.upgraded(m) }
        if existing == nil, let name = request.bitmap, !request.takeOverBitmap, try source.bitmapState(name) != .missing {
            throw ChainError(.refused, "bitmap '\(name)' already exists in \(source.name) and may belong to another repository (taking it over would make that one miss changes); choose another --bitmap, or pass --take-over-bitmap",
                             path: repo.path)
        }
        let id = existing?.id ?? request.repositoryID ?? BackupRepository.newID()
        let bitmap = existing?.bitmap ?? request.bitmap ?? "qbackup-\(id)"

        // Decide the kind of backup: incremental only when the chain and the bitmap can be trusted.
        let (kind, reason) = try decide(request.mode, existing, repo: repo, source: source, bitmap: bitmap)
        if let reason { logger.info("taking a full backup", metadata: ["reason": "\(reason)"]) }
        let takesOver = existing.map { $0.source != sourceRecord } ?? false
        if takesOver && kind != .full {
            throw ChainError(.refused, "the repository's backups are of \(existing?.source.summary ?? "another source"); continuing them as \(sourceRecord.summary) needs a full backup first",
                             path: repo.path)
        }

        let clusterSize = existing?.clusterSize ?? request.clusterSize ?? 65536
        let plan = try copyPlan(kind, source: source, bitmap: bitmap, clusterSize: UInt64(clusterSize))
        var manifest = existing ?? BackupManifest(id: id, virtualSize: source.virtualSize, clusterSize: clusterSize,
                                                  bitmap: request.tracking == .bitmap ? bitmap : nil, source: sourceRecord)
        let index = repo.nextIndex(of: manifest)
        if request.dryRun {
            return Result(kind: kind, layer: nil, index: index, bitmap: bitmap, bytesCopied: plan.bytes,
                          extents: plan.ranges.count, dryRun: true, virtualSize: source.virtualSize, reason: reason)
        }

        // 1. Journal the names about to be created, then write the layer under a temporary name.
        let now = Date()
        let name = repo.newLayerName(kind: kind, at: now)
        let created = BackupRepository.namesCreated(forLayer: name)
        manifest.journal += created.map { BackupManifest.JournalEntry(file: $0) }
        try repo.save(manifest)
        let temp = repo.file(name + BackupRepository.tempSuffix)
        let previous = kind == .incremental ? manifest.layers.last?.file : nil
        logger.info("writing layer", metadata: ["file": "\(name)", "kind": "\(kind.rawValue)", "bytes": "\(plan.bytes)"])
        let written: LayerWriter.Written
        do {
            written = try LayerWriter.write(plan: plan, from: source, to: temp, clusterSize: clusterSize,
                                           backing: previous, compression: request.compression, progress: progress)
            // A file truncated meanwhile reads as zeros: such a layer is not recorded (nor the bitmap touched).
            try source.checkUnchanged()
        } catch {
            try? DurableFiles.remove(temp)
            throw error
        }
        let (digest, identity) = written.digest
        // 2. Rename into place.
        try DurableFiles.rename(temp, to: repo.file(name))
        // 3. Record it in the manifest (its sidecar first), the journal done with its names.
        let layer = BackupManifest.Layer(index: index, file: name, kind: kind, mode: source.mode,
                                         created: BackupRepository.isoStamp(now), bytesCopied: written.bytes,
                                         fileSize: digest.size, virtualSize: source.virtualSize, digest: digest,
                                         identity: identity, checkpoint: request.tracking.checkpoint)
        manifest.virtualSize = source.virtualSize
        if takesOver {
            manifest.source = sourceRecord
            if request.tracking != .bitmap { manifest.bitmap = nil }
        }
        // A full layer stands alone (no backing file) and starts a new segment of the chain;
        // older points stay restorable until merge folds them away.
        manifest.layers.append(layer)
        manifest.journal.removeAll { $0.file.map(created.contains) ?? false }
        try repo.save(manifest)
        // 4. Only now: start tracking anew.
        try source.resetBitmap(bitmap)
        return Result(kind: kind, layer: layer, index: index, bitmap: bitmap, bytesCopied: written.bytes,
                      extents: plan.ranges.count, dryRun: false, virtualSize: source.virtualSize, reason: reason)
    }

    /// The ranges a layer copies: for a full layer everything that is data anywhere in the
    /// chain (zeros and holes stay unallocated), for an incremental one the bitmap's dirty
    /// extents; rounded out to whole layer clusters.
    static func copyPlan(_ kind: BackupManifest.Layer.Kind, source: BackupSource, bitmap: String,
                         clusterSize: UInt64) throws -> CopyPlan {
        switch kind {
        case .full:
            return try .data(of: source, grain: clusterSize)
        case .incremental:
            var plan = CopyPlan(size: source.virtualSize, grain: clusterSize)
            try source.forEachDirtyExtent(bitmap) { plan.add($0) }
            return plan
        }
    }

    /// Full or incremental, and why a full one when the mode let it be incremental. Auto takes a
    /// full layer for every reason a full layer fixes; `--incremental` refuses for each instead.
    static func decide(_ mode: Mode, _ manifest: BackupManifest?, repo: BackupRepository, source: BackupSource,
                       bitmap: String) throws -> (BackupManifest.Layer.Kind, reason: String?) {
        if mode == .full { return (.full, nil) }
        let why: String
        if manifest?.layers.isEmpty ?? true {
            guard mode == .auto else {
                throw ChainError(.refused, "the repository holds no full backup yet; run a full backup first", path: repo.path)
            }
            return (.full, nil)
        } else if let m = manifest, let broken = repo.brokenChain(m) {
            why = "the chain is broken: \(broken)"
        } else {
            switch try source.bitmapState(bitmap) {
            case .ready: return (.incremental, nil)
            case .missing: why = "bitmap '\(bitmap)' is missing from \(source.name), so changes since the last backup are unknown"
            case .disabled: why = "bitmap '\(bitmap)' in \(source.name) is disabled and may have missed writes"
            case .inconsistent(let what): why = "bitmap '\(bitmap)' in \(source.name) is inconsistent (\(what))"
            }
        }
        guard mode == .auto else {
            throw ChainError(.refused, "\(why); an incremental backup cannot be trusted (the bitmap is left as it was) — run a full backup",
                             path: repo.path)
        }
        return (.full, why)
    }
}
