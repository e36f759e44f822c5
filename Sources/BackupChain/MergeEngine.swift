import Logging
import QCowImage

/// Retention: folds the oldest layers so at most N remain, keeping every
/// remaining point in time restorable to the same bytes.
///
/// The new oldest layer k must stand alone. When it is already full, the older
/// files just leave the manifest. Otherwise the layers after k's full layer, up
/// to k, are committed into that full layer's file in place (as `qemu-img commit`
/// does: only their clusters are written), which makes it point k:
///
/// 1. the manifest records the pending merge (`into`: the full layer's file);
/// 2. each layer's own clusters are written into the full layer's file. Every point
///    from k on reads the same bytes throughout (the clusters written are covered by
///    a newer layer in their chains); only the points being dropped change, so a
///    crash here leaves the remaining points intact and the next run commits again;
/// 3. the file is synced and hashed, and the manifest records the checksum;
/// 4. the file is renamed over layer k's file (so layer k+1's backing name still fits);
/// 5. the manifest drops the folded layers; then their files are removed.
///
/// When the layers differ in virtual size (the disk grew), point k is written as
/// a new standalone file instead and swapped in the same way (steps 3-5).
/// `recover` finishes an interrupted merge (or undoes one that wrote a new file).
public enum MergeEngine {
    public struct Result: Sendable {
        public var folded: Int
        public var remaining: Int
        public var bytesWritten: UInt64
    }

    public static func merge(repository: String, keep: Int, logger: Logger = Logger(label: "qbackup.merge"),
                             progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        guard keep >= 1 else { throw ChainError(.invalidArgument, "--keep must be at least 1") }
        let repo = try BackupRepository(path: repository, exclusive: true)
        try recover(repo, logger: logger)
        try repo.removeLeftovers()
        guard var manifest = repo.manifest, manifest.layers.count > keep else {
            return Result(folded: 0, remaining: repo.manifest?.layers.count ?? 0, bytesWritten: 0)
        }
        let k = manifest.layers.count - keep
        let target = manifest.layers[k]
        var written: UInt64 = 0
        let base = manifest.segmentStart(of: k)
        if target.kind == .full {
            let dropped = manifest.layers[0..<k].map(\.file)
            manifest.layers.removeFirst(k)
            try repo.save(manifest)
            for file in dropped { try DurableFiles.remove(repo.file(file)) }
        } else if manifest.layers[base...k].allSatisfy({ $0.virtualSize == manifest.layers[base].virtualSize }) {
            manifest.pendingMerge = BackupManifest.PendingMerge(file: target.file, sha256: "", fileSize: 0, folded: k,
                                                                into: manifest.layers[base].file)
            try repo.save(manifest)
            written = try commitInPlace(repo, logger: logger, progress: progress, recovering: false)
        } else {
            written = try rewrite(repo, manifest, k, logger: logger, progress: progress)
        }
        logger.info("merged", metadata: ["folded": "\(k)", "remaining": "\(keep)"])
        return Result(folded: k, remaining: keep, bytesWritten: written)
    }

    /// Steps 2-5 of an in-place merge recorded in the manifest; returns the guest bytes written.
    /// `recovering`: an earlier attempt may have died midway, leaving leaked clusters to free.
    private static func commitInPlace(_ repo: BackupRepository, logger: Logger, progress: ((UInt64, UInt64) -> Void)?,
                                      recovering: Bool) throws -> UInt64 {
        guard var manifest = repo.manifest, let pending = manifest.pendingMerge, let into = pending.into else { return 0 }
        let base = manifest.segmentStart(of: pending.folded)
        let basePath = repo.file(into)
        let newer = manifest.layers[(base + 1)...pending.folded]
        let total = newer.reduce(UInt64(0)) { $0 + $1.virtualSize }
        var done: UInt64 = 0
        var written: UInt64 = 0
        let opened = try ImageOpener.open(basePath, format: .qcow2, writable: true)
        do {
            defer { opened.close() }
            guard let baseFile = opened as? QCowFile, baseFile.backing == nil else {
                throw ChainError(.corrupt, "the full layer has a backing file", path: basePath)
            }
            if recovering {
                let report = try QCowChecker.check(baseFile, repair: .leaks)
                guard report.corruptions == 0 else {
                    throw ChainError(.corrupt, "the full layer being merged into is corrupt; run 'qbackup check --repair all' on it",
                                     path: basePath)
                }
            }
            for layer in newer {
                let top = try QCowFile(device: try LocalFiles().open(repo.file(layer.file), writable: false, lock: true))
                defer { top.close() }
                let before = done
                let result = try ImageCommitter.commit(top: top, into: baseFile) { offset, _ in
                    progress?(before + offset, total)
                }
                written += result.dataBytes
                done += layer.virtualSize
            }
        }
        let (sha, size) = try DurableFiles.sha256(of: basePath)
        manifest.pendingMerge?.sha256 = sha
        manifest.pendingMerge?.fileSize = size
        try repo.save(manifest)
        try DurableFiles.rename(basePath, to: repo.file(pending.file))
        try finish(repo, logger: logger)
        return written
    }

    /// Writes point k as a new standalone file and swaps it in (layers of different sizes).
    private static func rewrite(_ repo: BackupRepository, _ manifest: BackupManifest, _ k: Int, logger: Logger,
                                progress: ((UInt64, UInt64) -> Void)?) throws -> UInt64 {
        var manifest = manifest
        let target = manifest.layers[k]
        let temp = repo.file(target.file + ".merge" + BackupRepository.tempSuffix)
        let image = try RestoreEngine.openPoint(repo.path, manifest, index: k)
        let source = GuestImageSource(image)
        let layer: LayerWriter.Written
        do {
            defer { source.close() }
            let plan = try CopyPlan.make(kind: .full, source: source, bitmap: "", clusterSize: UInt64(manifest.clusterSize))
            layer = try LayerWriter.write(plan: plan, from: source, to: temp, clusterSize: manifest.clusterSize,
                                          backing: nil, compression: .none, progress: progress)
        } catch {
            try? DurableFiles.remove(temp)
            throw error
        }
        let (sha, size) = layer.digest!
        // Record the intent, then switch the file, then finish.
        manifest.pendingMerge = BackupManifest.PendingMerge(file: target.file, sha256: sha, fileSize: size, folded: k)
        try repo.save(manifest)
        try DurableFiles.rename(temp, to: repo.file(target.file))
        try finish(repo, logger: logger)
        return layer.bytes
    }

    /// Completes (or undoes) a merge that a crash interrupted.
    static func recover(_ repo: BackupRepository, logger: Logger) throws {
        guard var manifest = repo.manifest, let pending = manifest.pendingMerge else { return }
        if let into = pending.into {
            if pending.sha256.isEmpty {
                logger.info("committing an interrupted merge again", metadata: ["into": "\(into)"])
                _ = try commitInPlace(repo, logger: logger, progress: nil, recovering: true)
            } else {
                logger.info("finishing an interrupted merge", metadata: ["file": "\(pending.file)"])
                if DurableFiles.exists(repo.file(into)) {
                    try DurableFiles.rename(repo.file(into), to: repo.file(pending.file))
                }
                try finish(repo, logger: logger)
            }
            return
        }
        let (sha, _) = try DurableFiles.sha256(of: repo.file(pending.file))
        if sha == pending.sha256 {
            logger.info("finishing an interrupted merge", metadata: ["file": "\(pending.file)"])
            try finish(repo, logger: logger)
        } else {
            logger.info("undoing an interrupted merge", metadata: ["file": "\(pending.file)"])
            manifest.pendingMerge = nil
            try repo.save(manifest)
            try DurableFiles.remove(repo.file(pending.file + ".merge" + BackupRepository.tempSuffix))
        }
    }

    /// The file of layer `folded` now holds the merged standalone layer: drop the older layers.
    private static func finish(_ repo: BackupRepository, logger: Logger) throws {
        guard var manifest = repo.manifest, let pending = manifest.pendingMerge else { return }
        // An in-place merge's full layer file was renamed to `pending.file`: not to be removed.
        let dropped = manifest.layers[0..<pending.folded].map(\.file).filter { $0 != pending.into }
        manifest.layers.removeFirst(pending.folded)
        manifest.layers[0].kind = .full
        manifest.layers[0].sha256 = pending.sha256
        manifest.layers[0].fileSize = pending.fileSize
        manifest.pendingMerge = nil
        try repo.save(manifest)
        for file in dropped { try DurableFiles.remove(repo.file(file)) }
    }
}
