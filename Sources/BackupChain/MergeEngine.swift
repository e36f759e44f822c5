import Logging
import QCowImage

/// Retention: folds the oldest layers so at most N remain, keeping every
/// remaining point in time restorable to the same bytes.
///
/// The new oldest layer k must stand alone. When it is already full, the older
/// files just leave the manifest. Otherwise its point in time is written as a
/// standalone file under a temporary name; the manifest records the pending
/// merge (file and checksum); the new file is renamed over layer k's file (so
/// layer k+1's backing name still fits); the manifest drops the folded layers;
/// then their files are removed. `recover` finishes or undoes an interrupted merge.
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
        if target.kind != .full {
            let digest: (hex: String, size: UInt64)
            // Write point k as a standalone layer under a temporary name.
            let temp = repo.file(target.file + ".merge" + BackupRepository.tempSuffix)
            let image = try RestoreEngine.openPoint(repo.path, manifest, index: k)
            let source = GuestImageSource(image)
            do {
                defer { source.close() }
                let plan = try CopyPlan.make(kind: .full, source: source, bitmap: "", clusterSize: UInt64(manifest.clusterSize))
                let layer = try LayerWriter.write(plan: plan, from: source, to: temp, clusterSize: manifest.clusterSize,
                                                  backing: nil, compression: .none, progress: progress)
                written = layer.bytes
                digest = layer.digest!
            } catch {
                try? DurableFiles.remove(temp)
                throw error
            }
            let (sha, size) = digest
            // Record the intent, then switch the file, then finish.
            manifest.pendingMerge = BackupManifest.PendingMerge(file: target.file, sha256: sha, fileSize: size, folded: k)
            try repo.save(manifest)
            try DurableFiles.rename(temp, to: repo.file(target.file))
            try finish(repo, logger: logger)
        } else {
            let dropped = manifest.layers[0..<k].map(\.file)
            manifest.layers.removeFirst(k)
            try repo.save(manifest)
            for file in dropped { try DurableFiles.remove(repo.file(file)) }
        }
        logger.info("merged", metadata: ["folded": "\(k)", "remaining": "\(keep)"])
        return Result(folded: k, remaining: keep, bytesWritten: written)
    }

    /// Completes (or undoes) a merge that a crash interrupted.
    static func recover(_ repo: BackupRepository, logger: Logger) throws {
        guard var manifest = repo.manifest, let pending = manifest.pendingMerge else { return }
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
        let dropped = manifest.layers[0..<pending.folded].map(\.file)
        manifest.layers.removeFirst(pending.folded)
        manifest.layers[0].kind = .full
        manifest.layers[0].sha256 = pending.sha256
        manifest.layers[0].fileSize = pending.fileSize
        manifest.pendingMerge = nil
        try repo.save(manifest)
        for file in dropped { try DurableFiles.remove(repo.file(file)) }
    }
}
