import FoundationEssentials
import Logging
import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `qbackup send`: writes a repository's points (all, those after an index, or those a
/// destination lacks) as a replication stream. The repository is held with the shared lock
/// for the whole stream, so no merge rewrites a file while it is sent. Each layer file goes
/// as it is on disk, sparsely: file holes and all-zero pieces as hole records, the rest in
/// data records of at most one 4 MiB chunk, lz4-framed unless `compression` is none.
public enum ReplicationSender {
    public struct Request: Sendable {
        public var repository: String
        /// Send the points after this index (the destination holds it and the ones before).
        public var after: Int?
        /// What the destination holds: its `list --output json`.
        public var have: ReplicaListing?
        public var compression: ReplicationStream.Compression
        /// How long to wait for a backup or merge that holds the repository (seconds).
        public var wait: Double
        public init(repository: String, after: Int? = nil, have: ReplicaListing? = nil,
                    compression: ReplicationStream.Compression = .lz4, wait: Double = 0) {
            self.repository = repository
            self.after = after
            self.have = have
            self.compression = compression
            self.wait = wait
        }
    }

    public struct Result: Sendable {
        /// The indices of the layers sent (folds included).
        public var layers: [Int]
        /// The indices of the points sent as folds (merges at the source).
        public var folds: [Int] = []
        /// The layer files' bytes the stream carries (their sizes, holes included).
        public var fileBytes: UInt64
        /// Bytes of the stream itself (what goes over the wire).
        public var streamBytes: UInt64
    }

    /// What a send would carry: the header and the layers, decided before anything is written.
    public struct Plan: Sendable {
        public var header: ReplicationStream.Header
        /// The records of the points sent, oldest first: new layers, and the new records of the
        /// points that folds (merges at the source) changed.
        public var layers: [BackupManifest.Layer]
        /// The folds among them, by the point's index.
        public var folds: [Int: Fold] = [:]
        /// The layer files' total size (progress).
        public var fileBytes: UInt64 { layers.reduce(0) { $0 + $1.fileSize } }
    }

    /// How a point that a merge at the source changed goes to the replica.
    public struct Fold: Sendable {
        /// The replica's points it replaces, oldest first.
        public var replaces: [Int]
        /// The replica's point whose file the new file is sent against (the one that shares the
        /// most chunks with it), if any.
        public var reference: Int?
        /// The chunks of the new file that the reference holds at the same place: not sent.
        public var copied: Set<Int>
        /// The replica's file of the point already is the new file (the merge only dropped the
        /// points before it): no bytes go.
        public var unchanged: Bool
    }

    /// Decides what to send from `manifest` given the request (nothing is read but the manifest).
    public static func plan(_ manifest: BackupManifest, after: Int?, have: ReplicaListing?,
                            compression: ReplicationStream.Compression, path: String) throws -> Plan {
        let m = manifest
        let origin = m.replicaOf ?? m.id
        guard m.pendingMerge == nil else {
            throw ChainError(.refused, "a merge was interrupted; run 'qbackup merge' to finish it before sending", path: path)
        }
        var base: [ReplicationStream.Point] = []
        var rest = m.layers
        var folds: [Int: Fold] = [:]
        if let after {
            guard let position = m.position(ofIndex: after) else {
                throw ChainError(.invalidArgument, "--after \(after): the repository holds no point with that index", path: path)
            }
            base = m.layers[...position].map(ReplicationStream.Point.init)
            rest = Array(m.layers[(position + 1)...])
        } else if let have {
            if let id = have.id {
                guard have.replicaOf == origin else {
                    let what = have.replicaOf.map { "a replica of \($0)" } ?? "a repository of its own"
                    throw ChainError(.refused, "the destination (repository \(id)) is \(what), not a replica of \(origin)", path: path)
                }
            }
            base = have.points
            (rest, folds) = try changes(m, have, path: path)
        }
        for layer in rest {
            guard layer.fileSize <= ReplicationStream.maxLayerBytes else {
                throw ChainError(.unsupported, "layer \(layer.index) (\(layer.file)) is larger than the \(ReplicationStream.maxLayerBytes >> 40) TiB a replication stream carries",
                                 path: path)
            }
            guard layer.damaged == nil, layer.chunks != nil else {
                throw ChainError(.refused, "layer \(layer.index) (\(layer.file)) has no verified chunk digests (\(layer.damaged ?? "a version 1 record")); run 'qbackup verify' and a backup first",
                                 path: path)
            }
        }
        let repository = LayerSidecar.Repository(id: origin, clusterSize: m.clusterSize, source: m.source, bitmap: m.bitmap,
                                                 replicaOf: nil, group: nil)
        let header = ReplicationStream.Header(repository: repository, virtualSize: m.virtualSize, base: base, layers: rest.count,
                                              compression: compression)
        return Plan(header: header, layers: rest, folds: folds)
    }

    /// What the destination lacks, point by point: a point it holds as it is goes not at all;
    /// a point after all of its points goes as a new layer; a point that replaces some of its
    /// points (a merge at the source folded them into it since) goes as a fold. The destination's
    /// points were once this repository's (indices are never reused), so anything else does not fit.
    static func changes(_ m: BackupManifest, _ have: ReplicaListing, path: String) throws -> ([BackupManifest.Layer], [Int: Fold]) {
        let theirs = have.points
        var next = 0
        var rest: [BackupManifest.Layer] = []
        var folds: [Int: Fold] = [:]
        func misfit() -> ChainError {
            ChainError(.refused, "the destination's points (\(describe(theirs))) are not this repository's points (\(describe(m.layers.map(ReplicationStream.Point.init)))) or older ones merged into them; it does not fit",
                       path: path)
        }
        for layer in m.layers {
            let start = next
            while next < theirs.count && theirs[next].index <= layer.index { next += 1 }
            let replaced = start..<next
            if replaced.isEmpty {
                // A new point: the destination must hold nothing newer.
                guard next == theirs.count else { throw misfit() }
                rest.append(layer)
                continue
            }
            if replaced.count == 1 && theirs[start] == ReplicationStream.Point(layer) { continue }
            let held = layer.chunks ?? []
            // The replica's file that shares the most chunks with the new one, at the same places.
            var best: (index: Int, copied: Set<Int>)?
            for i in replaced {
                guard i < have.chunks.count, let chunks = have.chunks[i] else { continue }
                let same = Set((0..<min(held.count, chunks.count)).filter { held[$0] == chunks[$0] })
                if !same.isEmpty && same.count > (best?.copied.count ?? 0) { best = (theirs[i].index, same) }
            }
            let unchanged = theirs[next - 1] == ReplicationStream.Point(index: layer.index, sha256: layer.sha256)
            folds[layer.index] = Fold(replaces: theirs[replaced].map(\.index), reference: best?.index, copied: best?.copied ?? [],
                                      unchanged: unchanged)
            rest.append(layer)
        }
        guard next == theirs.count else { throw misfit() }
        return (rest, folds)
    }

    static func describe(_ points: [ReplicationStream.Point]) -> String {
        points.isEmpty ? "none" : points.map { String($0.index) }.joined(separator: ", ")
    }

    /// Writes the stream of `request` to `output`. `progress(done, total)` counts layer bytes.
    public static func send(_ request: Request, to output: StreamOutput, logger: Logger = Logger(label: "qbackup.send"),
                            progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        if request.after != nil && request.have != nil { throw ChainError(.invalidArgument, "--after and --have exclude each other") }
        let repo = try BackupRepository(path: request.repository, exclusive: false, wait: request.wait, createLock: false)
        guard let m = repo.manifest, !m.layers.isEmpty else {
            throw ChainError(.invalidArgument, "the repository holds no backup to send", path: request.repository)
        }
        let plan = try plan(m, after: request.after, have: request.have, compression: request.compression, path: repo.path)
        // Written on a thread of its own, so reading and compressing the next record overlaps the pipe.
        let behind = (output as? DescriptorStream).map { WriteBehindStream($0) }
        do {
            let result = try send(plan, from: repo, to: StreamWriter(behind ?? output), request: request, logger: logger, progress: progress)
            try behind?.finish()
            return result
        } catch {
            try? behind?.finish()
            throw error
        }
    }

    private static func send(_ plan: Plan, from repo: BackupRepository, to writer: StreamWriter, request: Request, logger: Logger,
                             progress: ((UInt64, UInt64) -> Void)?) throws -> Result {
        // A stream without folds stays version 1, which a qbackup that knows no folds reads.
        try writer.preamble(version: plan.folds.isEmpty ? 1 : ReplicationStream.version)
        try writer.json(.header, plan.header)
        var sender = LayerSender(writer: writer, compression: request.compression, total: plan.fileBytes, progress: progress)
        for layer in plan.layers {
            if let fold = plan.folds[layer.index] {
                logger.debug("sending fold", metadata: ["index": "\(layer.index)", "replaces": "\(fold.replaces)",
                                                        "reference": "\(fold.reference.map { String($0) } ?? "none")",
                                                        "chunks-copied": "\(fold.copied.count)"])
                try sender.send(layer, fold: fold, from: repo)
            } else {
                logger.debug("sending layer", metadata: ["index": "\(layer.index)", "file": "\(layer.file)"])
                try sender.send(layer, from: repo)
            }
        }
        var end = ByteWriter()
        end.u64(UInt64(plan.layers.count))
        end.u64(0)
        try writer.record(.end, end.bytes)
        return Result(layers: plan.layers.map(\.index), folds: plan.folds.keys.sorted(), fileBytes: plan.fileBytes,
                      streamBytes: writer.bytesWritten)
    }
}

/// Sends layer files through one reusable pair of 4 MiB buffers.
struct LayerSender {
    let writer: StreamWriter
    let compression: ReplicationStream.Compression
    let total: UInt64
    let progress: ((UInt64, UInt64) -> Void)?
    private var done: UInt64 = 0
    private var piece: [UInt8]
    private var record: [UInt8]

    init(writer: StreamWriter, compression: ReplicationStream.Compression, total: UInt64,
         progress: ((UInt64, UInt64) -> Void)?) {
        self.writer = writer
        self.compression = compression
        self.total = total
        self.progress = progress
        piece = [UInt8](repeating: 0, count: ReplicationStream.maxDataBytes)
        record = [UInt8](repeating: 0, count: ReplicationStream.RecordType.data.maxPayload)
    }

    /// The layer record (without chunks and identity: the receiver hashes what it gets), the
    /// file's bytes in order as data and hole records, then the end record with its sha256.
    mutating func send(_ layer: BackupManifest.Layer, from repo: BackupRepository) throws {
        try writer.json(.layer, Self.announced(layer))
        try sendFile(layer, from: repo, copied: [])
    }

    /// A fold record, then the new file's bytes with copy records for the chunks the replica's
    /// reference file holds (none when its file of the point is already the new one), then the end.
    mutating func send(_ layer: BackupManifest.Layer, fold: ReplicationSender.Fold, from repo: BackupRepository) throws {
        try writer.json(.fold, ReplicationStream.Fold(layer: Self.announced(layer), replaces: fold.replaces, reference: fold.reference))
        guard !fold.unchanged else {
            done += layer.fileSize
            progress?(done, total)
            return try writer.record(.layerEnd, LayerDigest.bytes(ofHex: layer.sha256))
        }
        try sendFile(layer, from: repo, copied: fold.reference == nil ? [] : fold.copied)
    }

    /// A record as the stream carries it: no chunks, chunk size or identity.
    static func announced(_ layer: BackupManifest.Layer) -> BackupManifest.Layer {
        var announced = layer
        announced.chunks = nil
        announced.chunkSize = nil
        announced.identity = nil
        return announced
    }

    /// The file's bytes in order, chunk by chunk: a chunk in `copied` as (part of) a copy record,
    /// the others as data and hole records; then the end record.
    private mutating func sendFile(_ layer: BackupManifest.Layer, from repo: BackupRepository, copied: Set<Int>) throws {
        let path = repo.file(layer.file)
        let device = try RepositoryFiles(directory: repo.path).openFile(path, writable: false)
        defer { device.close() }
        let size = try device.size()
        guard size == layer.fileSize else {
            throw ChainError(.refused, "layer \(layer.index) is \(size) bytes, the manifest says \(layer.fileSize): it changed since it was recorded; run 'qbackup verify'",
                             path: path)
        }
        let chunk = UInt64(ReplicationStream.maxDataBytes)
        var hole: (start: UInt64, length: UInt64)?
        var copy: (start: UInt64, length: UInt64)?
        var offset: UInt64 = 0
        while offset < size {
            let chunkEnd = min(size, (offset / chunk + 1) * chunk)
            if copied.contains(Int(offset / chunk)) {
                if let h = hole { try sendHole(h) }
                hole = nil
                if let c = copy, c.start + c.length == offset {
                    copy = (c.start, c.length + chunkEnd - offset)
                } else {
                    copy = (offset, chunkEnd - offset)
                }
                done += chunkEnd - offset
                offset = chunkEnd
                progress?(done, total)
                continue
            }
            if let c = copy { try sendRange(.copy, c) }
            copy = nil
            // A hole may run on past the chunk unless a copied chunk could follow.
            let dataStart = min(copied.isEmpty ? size : chunkEnd, device.nextData(from: offset) ?? size)
            if dataStart > offset {
                hole = try extend(hole, offset, dataStart - offset)
                done += dataStart - offset
                offset = dataStart
                continue
            }
            // Pieces end at chunk boundaries, so each is hashed into one chunk at the other end.
            let end = min(chunkEnd, max(offset + 1, device.nextHole(from: offset) ?? size))
            let count = Int(end - offset)
            try piece.withUnsafeMutableBytes {
                try device.readFully(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]), at: offset, region: "layer data")
            }
            if piece.withUnsafeBytes({ Zeros.isZero(UnsafeRawBufferPointer(rebasing: $0[0..<count])) }) {
                hole = try extend(hole, offset, UInt64(count))
            } else {
                if let h = hole { try sendHole(h) }
                hole = nil
                try sendData(at: offset, count: count)
            }
            offset = end
            done += UInt64(count)
            progress?(done, total)
        }
        if let h = hole { try sendHole(h) }
        if let c = copy { try sendRange(.copy, c) }
        try writer.record(.layerEnd, LayerDigest.bytes(ofHex: layer.sha256))
    }

    /// `hole` grown by a run at `start` (sent first when it is not adjacent).
    private func extend(_ hole: (start: UInt64, length: UInt64)?, _ start: UInt64, _ length: UInt64) throws
        -> (start: UInt64, length: UInt64)
    {
        guard let h = hole else { return (start, length) }
        if h.start + h.length == start { return (h.start, h.length + length) }
        try sendHole(h)
        return (start, length)
    }

    private func sendHole(_ hole: (start: UInt64, length: UInt64)) throws { try sendRange(.hole, hole) }

    /// A hole or copy record: offset u64, length u64.
    private func sendRange(_ type: ReplicationStream.RecordType, _ range: (start: UInt64, length: UInt64)) throws {
        var w = ByteWriter()
        w.u64(range.start)
        w.u64(range.length)
        try writer.record(type, w.bytes)
    }

    private mutating func sendData(at offset: UInt64, count: Int) throws {
        var head = ByteWriter()
        head.u64(offset)
        head.u32(UInt32(count))
        let headSize = ReplicationStream.dataHeaderSize
        let compressed: Int? = compression == .lz4
            ? piece.withUnsafeBytes { input in
                record.withUnsafeMutableBytes {
                    LZ4Frames.compress(UnsafeRawBufferPointer(rebasing: input[0..<count]),
                                       into: UnsafeMutableRawBufferPointer(rebasing: $0[headSize...]))
                }
            }
            : nil
        head.u8(compressed == nil ? ReplicationStream.Encoding.none.rawValue : ReplicationStream.Encoding.lz4.rawValue)
        head.zeros(3)
        let length: Int
        if let compressed {
            length = headSize + compressed
        } else {
            piece.withUnsafeBytes { input in
                record.withUnsafeMutableBytes {
                    UnsafeMutableRawBufferPointer(rebasing: $0[headSize..<(headSize + count)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: input[0..<count]))
                }
            }
            length = headSize + count
        }
        record.replaceSubrange(0..<headSize, with: head.bytes)
        try record.withUnsafeBytes { try writer.record(.data, UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
    }
}

/// A page of zeros to compare with and to hash holes from.
enum Zeros {
    nonisolated(unsafe) static let buffer: UnsafeMutableRawBufferPointer = {
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0)
        return p
    }()

    /// Whether every byte of `bytes` is zero (memcmp against the zero page, 1 MiB at a time).
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress, let zeros = buffer.baseAddress else { return true }
        var at = 0
        while at < bytes.count {
            let n = min(buffer.count, bytes.count - at)
            if memcmp(base + at, zeros, n) != 0 { return false }
            at += n
        }
        return true
    }
}
