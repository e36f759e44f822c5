import FoundationEssentials
import Logging
import QCowImage

#if canImport(Glibc)
import Glibc
#endif

/// `repair`: rebuilds a lost or unreadable manifest from the layer files. From the layers'
/// sidecars when they are there (exactly: indices, ids, bitmap, source), else from the backing
/// chains of the layer files qbackup names (`full-…`/`incr-…`; indices renumbered, checksums
/// computed anew). Every file used is hashed and its backing link read; a layer that does not
/// fit (damaged, missing its backing layer) is left out and said so. Writes only when asked to,
/// and then the manifest (and the sidecars it lacks) in the order every save uses, so a crash or
/// kill leaves the repository as it was or repaired.
public enum RepairEngine {
    public struct Request: Sendable {
        public var repository: String
        /// Write the rebuilt manifest (`--yes`); otherwise only show it.
        public var write: Bool
        /// The disk the repository backs up, when no sidecar says (`--source IMAGE`).
        public var source: String?
        public init(repository: String, write: Bool, source: String? = nil) {
            self.repository = repository
            self.write = write
            self.source = source
        }
    }

    public enum Basis: String, Sendable { case sidecars, backingChains = "backing-chains", manifest }

    public struct Result: Sendable {
        /// What the rebuilt manifest comes from.
        public var basis: Basis
        /// The manifest as rebuilt (nil when nothing could be).
        public var manifest: BackupManifest?
        /// Why the old manifest could not be used (nil when there was none).
        public var manifestProblem: String?
        /// Files that were not taken, each with the reason.
        public var leftOut: [(file: String, reason: String)]
        /// Why the rebuilt manifest names a new bitmap (its old one does not cover the rebuilt chain).
        public var bitmapNote: String?
        /// The rebuilt manifest was written.
        public var written: Bool
        /// The manifest on disk already said exactly this: nothing to repair.
        public var unchanged: Bool
    }

    public static func repair(_ request: Request, logger: Logger = Logger(label: "qbackup.repair")) throws -> Result {
        // Only looking (no --yes): a shared lock, and no lock file made where there is none.
        let repo = try BackupRepository(path: request.repository, exclusive: request.write, tolerant: true,
                                        createLock: request.write)
        if repo.manifest?.pendingMerge != nil {
            throw ChainError(.refused, "a merge was interrupted; 'qbackup merge' finishes it (repair rebuilds only a lost manifest)",
                             path: repo.path)
        }
        var leftOut: [(String, String)] = []
        let (sidecars, unreadable) = repo.readSidecars()
        for (name, reason) in unreadable {
            leftOut.append((String(name.dropLast(LayerSidecar.suffix.count)), "its sidecar \(name) cannot be used: \(reason)"))
        }
        var rebuilt: BackupManifest?
        var basis = Basis.sidecars
        if !sidecars.isEmpty {
            rebuilt = fromSidecars(repo, sidecars.map(\.1), prefer: repo.manifest?.id, leftOut: &leftOut)
        }
        if rebuilt == nil, let current = repo.manifest, sidecars.isEmpty {
            // A readable manifest and no sidecars (a version 1 repository): nothing is lost.
            basis = .manifest
            rebuilt = current
        }
        // Layer files without a sidecar: the whole folder's backing chains when no sidecar says
        // anything, else the chains that continue after the last layer the sidecars describe
        // (a repair from backing chains killed while it wrote the sidecars, which it writes in order).
        if basis != .manifest {
            let described = Set(sidecars.map(\.1.layer.file) + unreadable.map { String($0.name.dropLast(LayerSidecar.suffix.count)) })
            if rebuilt == nil { basis = .backingChains }
            rebuilt = try fromBackingChains(repo, continuing: rebuilt, skipping: described, source: request.source,
                                            leftOut: &leftOut)
        }
        var bitmapNote: String?
        if basis == .sidecars, var m = rebuilt, let bitmap = m.bitmap {
            // The bitmap was cleared when the newest layer was taken: if that layer (or one whose
            // sidecar cannot be read) is left out, it no longer covers the rebuilt chain's last
            // point, and an incremental on top would miss writes. A new name makes the next backup full.
            let newest = sidecars.map(\.1).filter { $0.repository.id == m.id }.map(\.layer.index).max()
            if !unreadable.isEmpty || newest != m.layers.last?.index {
                m.bitmap = "qbackup-\(m.id)-\(BackupRepository.newID().prefix(8))"
                bitmapNote = "the bitmap \(bitmap) was cleared by a layer left out, so it does not cover the rebuilt chain: the next backup takes a full layer and bitmap \(m.bitmap ?? ""); remove \(bitmap) from the disk with 'qbackup bitmap remove'"
                rebuilt = m
            }
        }
        if let current = repo.manifest, let m = rebuilt {
            // A readable manifest keeps every layer it lists: repair adds, it never drops a record.
            let kept = Set(m.layers.map(\.file))
            let dropped = current.layers.map(\.file).filter { !kept.contains($0) }
            guard dropped.isEmpty else {
                throw ChainError(.refused, "the manifest lists \(dropped.joined(separator: ", ")), which the rebuilt one would leave out (\(leftOut.map { "\($0.0): \($0.1)" }.joined(separator: "; "))); repair never drops a listed layer — 'qbackup verify \(repo.path)' says what is wrong",
                                 path: repo.path)
            }
        }
        let unchanged = rebuilt != nil && rebuilt == repo.manifest.map { var c = $0; c.journal = []; return c }
            && repo.manifest?.journal.isEmpty == true
        var written = false
        if request.write, let m = rebuilt, !unchanged {
            logger.info("writing the rebuilt manifest", metadata: ["layers": "\(m.layers.count)", "basis": "\(basis.rawValue)"])
            try repo.save(m)
            written = true
        }
        return Result(basis: basis, manifest: rebuilt, manifestProblem: repo.manifestProblem, leftOut: leftOut,
                      bitmapNote: bitmapNote, written: written, unchanged: unchanged)
    }

    /// The manifest the sidecars of one repository describe (the one the readable manifest
    /// names, else the one most sidecars name), each layer checked against its file.
    static func fromSidecars(_ repo: BackupRepository, _ sidecars: [LayerSidecar], prefer: String?,
                             leftOut: inout [(String, String)]) -> BackupManifest? {
        var byID: [String: [LayerSidecar]] = [:]
        for sidecar in sidecars { byID[sidecar.repository.id, default: []].append(sidecar) }
        guard let id = prefer.flatMap({ byID[$0] == nil ? nil : $0 })
            ?? byID.max(by: { ($0.value.count, $1.key) < ($1.value.count, $0.key) })?.key,
              let mine = byID[id]
        else { return nil }
        for (other, records) in byID where other != id {
            for r in records { leftOut.append((r.layer.file, "its sidecar names another repository (\(other))")) }
        }
        let ordered = mine.sorted { $0.layer.index < $1.layer.index }
        guard let newest = ordered.last else { return nil }
        var m = BackupManifest(id: id, virtualSize: newest.layer.virtualSize, clusterSize: newest.repository.clusterSize,
                               bitmap: newest.repository.bitmap, source: newest.repository.source)
        m.replicaOf = newest.repository.replicaOf
        m.group = newest.repository.group
        var seenIndex = Set<Int>()
        for record in ordered {
            var layer = record.layer
            guard seenIndex.insert(layer.index).inserted else {
                leftOut.append((layer.file, "another sidecar claims index \(layer.index)"))
                continue
            }
            if let problem = check(repo, &layer, after: m.layers.last) {
                leftOut.append((layer.file, problem))
                continue
            }
            m.layers.append(layer)
        }
        guard let last = m.layers.last else { return nil }
        m.virtualSize = last.virtualSize
        return m
    }

    /// Whether `layer`'s file still is what its record says (size and every chunk) and links to
    /// the layer before it; a file whose identity changed (copied, hard-linked) but whose bytes
    /// match gets its identity recorded anew.
    static func check(_ repo: BackupRepository, _ layer: inout BackupManifest.Layer,
                      after previous: BackupManifest.Layer?) -> String? {
        let path = repo.file(layer.file)
        do {
            let device = try RepositoryFiles(directory: repo.path).openFile(path, writable: false)
            defer { device.close() }
            if let problem = try LayerDigest.problem(device, layer: layer) { return problem }
            let header = try header(of: device, size: layer.fileSize)
            let expected = layer.kind == .incremental ? previous?.file : nil
            if layer.kind == .incremental && previous == nil { return "an incremental layer with no layer before it" }
            if header.backingFile != expected {
                return "its backing file is \(header.backingFile ?? "none"), the layer before it is \(expected ?? "none")"
            }
            layer.identity = try LayerDigest.identity(of: device)
            return nil
        } catch {
            return (error as? CodedError)?.description ?? "\(error)"
        }
    }

    static func header(of device: BlockDevice, size: UInt64) throws -> QCowHeader {
        try QCowHeader(decoding: try device.readBytes(Int(min(size, 2 << 20)), at: 0, region: "header"))
    }

    /// A manifest from the backing chains of the folder's layer-named qcow2 files (those not in
    /// `skipping`): each full layer starts a segment, each incremental follows the file it backs
    /// onto; segments in the order of their names (qbackup's names carry the time). Indices are
    /// numbered anew. With `base` (rebuilt from sidecars), only chains that continue after its
    /// last layer (onto it, or new segments named later) are appended to it.
    static func fromBackingChains(_ repo: BackupRepository, continuing base: BackupManifest?, skipping: Set<String>,
                                  source: String?, leftOut: inout [(String, String)]) throws -> BackupManifest? {
        let last = base?.layers.last
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: repo.path)) ?? [])
            .filter { BackupRepository.isLayerFileName($0) && !skipping.contains($0) }
            .filter { name in last.map { order(of: name) >= order(of: $0.file) } ?? true }.sorted()
        guard !names.isEmpty else { return base }
        struct Found { var name: String; var backing: String?; var virtualSize: UInt64; var clusterSize: Int }
        var found: [String: Found] = [:]
        for name in names {
            do {
                let device = try RepositoryFiles(directory: repo.path).openFile(repo.file(name), writable: false)
                defer { device.close() }
                let header = try header(of: device, size: try device.size())
                found[name] = Found(name: name, backing: header.backingFile, virtualSize: header.size,
                                    clusterSize: 1 << Int(header.clusterBits))
            } catch {
                leftOut.append((name, (error as? CodedError)?.description ?? "\(error)"))
            }
        }
        // A chain starts at a full layer, or (after `base`) at an incremental backed by its last layer.
        func startsChain(_ f: Found) -> Bool { f.backing == nil || (last != nil && f.backing == last?.file) }
        // Children by backing name; a file backed by two others' files is a fork: the older one is taken.
        var next: [String: String] = [:]
        for f in found.values.sorted(by: { $0.name < $1.name }) {
            guard let backing = f.backing, !startsChain(f) else { continue }
            guard found[backing] != nil else {
                leftOut.append((f.name, "its backing file \(backing) is not a layer file this repair takes"))
                continue
            }
            if let taken = next[backing] {
                leftOut.append((f.name, "\(backing) already has a newer layer on it (\(taken))"))
                continue
            }
            next[backing] = f.name
        }
        var chain: [Found] = []
        var onto = false
        for start in found.values.filter(startsChain).sorted(by: { order(of: $0.name) < order(of: $1.name) }) {
            if start.backing != nil {
                // Only one chain continues the base's last layer, and it comes first.
                guard !onto, chain.isEmpty else {
                    leftOut.append((start.name, "\(start.backing ?? "") already has a newer layer on it"))
                    continue
                }
                onto = true
            }
            var at: String? = start.name
            var seen = Set<String>()
            while let name = at, let f = found[name], seen.insert(name).inserted {
                chain.append(f)
                at = next[name]
            }
        }
        let taken = Set(chain.map(\.name))
        for f in found.values where !taken.contains(f.name) && f.backing != nil && found[f.backing ?? ""] != nil
            && next[f.backing ?? ""] == f.name {
            leftOut.append((f.name, "its chain does not start at a full layer"))
        }
        guard let first = chain.first, let newest = chain.last else { return base }
        var m: BackupManifest
        if let base {
            m = base
        } else {
            guard let source else {
                throw ChainError(.invalidArgument, "the layer files have no sidecars, so nothing says which disk they back up; give it with --source IMAGE",
                                 path: repo.path)
            }
            let id = BackupRepository.newID()
            m = BackupManifest(id: id, virtualSize: newest.virtualSize, clusterSize: first.clusterSize,
                               bitmap: "qbackup-\(id)", source: .localFile(source))
        }
        for f in chain {
            let (digest, identity) = try LayerDigest.compute(path: repo.file(f.name))
            m.layers.append(BackupManifest.Layer(index: (m.layers.last?.index ?? -1) + 1, file: f.name,
                                                 kind: f.backing == nil ? .full : .incremental,
                                                 created: createdStamp(of: f.name), bytesCopied: 0, fileSize: digest.size,
                                                 virtualSize: f.virtualSize, digest: digest, identity: identity))
        }
        m.virtualSize = newest.virtualSize
        return m
    }

    /// When a layer-named file was made, as far as its name says: the time, then the number
    /// qbackup adds to a name already used in that second (`incr-…Z-2.qcow2` after `incr-…Z.qcow2`).
    static func order(of name: String) -> (String, Int) {
        let b = Array(name.utf8)
        let stamp = String(decoding: b[5..<21], as: UTF8.self)
        let rest = b[21..<(b.count - 6)]
        return (stamp, rest.isEmpty ? 1 : Int(String(decoding: rest.dropFirst(), as: UTF8.self)) ?? 0)
    }

    /// The ISO 8601 time in a layer file's name (`full-20261125T094800Z.qcow2`).
    static func createdStamp(of name: String) -> String {
        let b = Array(name.utf8)
        func s(_ r: Range<Int>) -> String { String(decoding: b[r], as: UTF8.self) }
        return "\(s(5..<9))-\(s(9..<11))-\(s(11..<13))T\(s(14..<16)):\(s(16..<18)):\(s(18..<20))Z"
    }
}
