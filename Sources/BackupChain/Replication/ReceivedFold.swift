import FoundationEssentials
import QCowImage

#if canImport(Glibc)
import Glibc
#endif

/// A fold received from the source (docs/replication-stream.md, "Fold"), on its way into a
/// replica: the replica's journal holds it from the moment the new file of the point is
/// complete, checked and flushed under its temporary name until the manifest lists it.
///
/// The switch (`finish`): the temporary file is renamed to the point's file name, then the
/// manifest replaces the points `replaces` by `layer` (the source's record, with the replica's
/// own chunk digests and identity) and the files of the other replaced points are removed
/// (journaled, as a merge drops its layers). A run that dies anywhere in it leaves the record in
/// the journal, and the next open of the replica (receive, list, verify, restore, send)
/// finishes it: the fold is decided once the record is durable. A temporary file that is no
/// longer the one recorded (its identity differs) undoes it instead: the old points stay.
///
/// The repository's own merges use `PendingMerge`; a received fold does not, because a
/// merge's finish makes a new file's layer `full` and recounts its bytes, while a replica
/// takes the source's record as it is.
public struct ReceivedFold: Codable, Equatable, Sendable {
    /// The point's new record, as the source has it, with the chunks and identity of the
    /// replica's received file.
    public var layer: BackupManifest.Layer
    /// The indices of the replica's points it replaces, oldest first; the last is `layer.index`
    /// when the replica held that point (its file keeps its name), else older.
    public var replaces: [Int]
    /// The received file under its temporary name (`layer.file` + `.partial`) until renamed.
    public var temp: String

    public init(layer: BackupManifest.Layer, replaces: [Int], temp: String) {
        self.layer = layer
        self.replaces = replaces
        self.temp = temp
    }

    /// The positions in `m.layers` of the replaced points, or nil when they are not a run of
    /// consecutive layers of `m` that `layer` can take the place of: its index at or after the
    /// last one (and before the next layer's), its file the last one's when it keeps the index,
    /// else a name no layer of `m` has; a full layer when the run begins the chain.
    static func run(of replaces: [Int], for layer: BackupManifest.Layer, in m: BackupManifest) -> Range<Int>? {
        guard let first = replaces.first, let last = replaces.last, replaces.count <= BackupManifest.maxLayers,
              let start = m.position(ofIndex: first), start + replaces.count <= m.layers.count
        else { return nil }
        let run = start..<(start + replaces.count)
        guard zip(run, replaces).allSatisfy({ m.layers[$0].index == $1 }) else { return nil }
        if run.upperBound < m.layers.count && m.layers[run.upperBound].index <= layer.index { return nil }
        if layer.index == last {
            guard m.layers[run.upperBound - 1].file == layer.file else { return nil }
        } else {
            guard layer.index > last, run.upperBound == m.layers.count, !m.layers.contains(where: { $0.file == layer.file })
            else { return nil }
        }
        guard start > 0 || layer.kind == .full else { return nil }
        return run
    }

    /// Part of the manifest's validation (a journal is untrusted input like the rest of it).
    func validate(in m: BackupManifest, _ bad: (String) -> ChainError) throws {
        guard let run = Self.run(of: replaces, for: layer, in: m) else {
            throw bad("the received fold's points \(replaces) are not a run of the layers its point \(layer.index) can replace")
        }
        guard BackupRepository.isLayerFileName(layer.file), temp == layer.file + BackupRepository.tempSuffix else {
            throw bad("the received fold's file names are not valid")
        }
        try m.validate(layer, at: run.lowerBound, bad)
    }

    /// Switches in the journal's received fold (a fresh receive, or one a crash interrupted):
    /// rename, then the manifest, then the replaced files go.
    static func finish(_ repo: BackupRepository) throws {
        guard var m = repo.manifest, let fold = m.receivedFold else { return }
        let temp = repo.file(fold.temp)
        let target = repo.file(fold.layer.file)
        if DurableFiles.exists(temp) {
            guard identity(of: temp) == fold.layer.identity else { return try undo(repo) }
            try DurableFiles.rename(temp, to: target)
        } else if identity(of: target) != fold.layer.identity {
            // Neither the received file nor it renamed: the fold did not happen.
            return try undo(repo)
        }
        guard let run = Self.run(of: fold.replaces, for: fold.layer, in: m) else { return try undo(repo) }
        let dropped = m.layers[run].map(\.file).filter { $0 != fold.layer.file }
        m.layers.replaceSubrange(run, with: [fold.layer])
        m.virtualSize = m.layers.last?.virtualSize ?? m.virtualSize
        m.receivedFold = nil
        let names = BackupRepository.namesCreated(forLayer: fold.layer.file)
        m.journal.removeAll { $0.file.map(names.contains) ?? false }
        try repo.saveDropping(m, files: dropped)
    }

    /// The fold leaves the journal and the replica keeps its points; the temporary file stays
    /// journaled (the next receive removes it).
    private static func undo(_ repo: BackupRepository) throws {
        guard var m = repo.manifest else { return }
        m.receivedFold = nil
        try repo.save(m)
    }

    /// A regular file's identity (inode, size, mtime), not following a symbolic link.
    static func identity(of path: String) -> BackupManifest.Identity? {
        var st = stat()
        guard lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { return nil }
        return LayerDigest.identity(st)
    }
}
