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
        /// The indices of the layers sent.
        public var layers: [Int]
        /// The layer files' bytes the stream carries (their sizes, holes included).
        public var fileBytes: UInt64
        /// Bytes of the stream itself (what goes over the wire).
        public var streamBytes: UInt64
    }

    /// What a send would carry: the header and the layers, decided before anything is written.
    public struct Plan: Sendable {
        public var header: ReplicationStream.Header
        public var layers: [BackupManifest.Layer]
        /// The layer files' total size (progress).
        public var fileBytes: UInt64 { layers.reduce(0) { $0 + $1.fileSize } }
    }

    /// Decides what to send from `manifest` given the request (nothing is read but the manifest).
    public static func plan(_ manifest: BackupManifest, after: Int?, have: ReplicaListing?,
                            compression: ReplicationStream.Compression, path: String) throws -> Plan {
        let m = manifest
        let origin = m.replicaOf ?? m.id
        guard m.pendingMerge == nil else {
            throw ChainError(.refused, "a merge was interrupted; run 'qbackup merge' to finish it before sending", path: path)
        }
        var base: [BackupManifest.Layer] = []
        if let after {
            guard let position = m.position(ofIndex: after) else {
                throw ChainError(.invalidArgument, "--after \(after): the repository holds no point with that index", path: path)
            }
            base = Array(m.layers[...position])
        } else if let have {
            if let id = have.id {
                guard have.replicaOf == origin else {
                    let what = have.replicaOf.map { "a replica of \($0)" } ?? "a repository of its own"
                    throw ChainError(.refused, "the destination (repository \(id)) is \(what), not a replica of \(origin)", path: path)
                }
            }
            let mine = m.layers.map(ReplicationStream.Point.init)
            guard have.points.count <= mine.count, Array(mine.prefix(have.points.count)) == have.points else {
                throw ChainError(.refused, "the destination's points (\(describe(have.points))) are not the first of this repository's (\(describe(mine))); it does not fit",
                                 path: path)
            }
            base = Array(m.layers.prefix(have.points.count))
        }
        let rest = Array(m.layers.dropFirst(base.count))
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
        let header = ReplicationStream.Header(repository: repository, virtualSize: m.virtualSize,
                                              base: base.map(ReplicationStream.Point.init), layers: rest.count,
                                              compression: compression)
        return Plan(header: header, layers: rest)
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
        let writer = StreamWriter(output)
        try writer.preamble()
        try writer.json(.header, plan.header)
        var sender = LayerSender(writer: writer, compression: request.compression, total: plan.fileBytes, progress: progress)
        for layer in plan.layers {
            logger.debug("sending layer", metadata: ["index": "\(layer.index)", "file": "\(layer.file)"])
            try sender.send(layer, from: repo)
        }
        var end = ByteWriter()
        end.u64(UInt64(plan.layers.count))
        end.u64(0)
        try writer.record(.end, end.bytes)
        return Result(layers: plan.layers.map(\.index), fileBytes: plan.fileBytes, streamBytes: writer.bytesWritten)
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
        var announced = layer
        announced.chunks = nil
        announced.chunkSize = nil
        announced.identity = nil
        try writer.json(.layer, announced)
        let path = repo.file(layer.file)
        let device = try RepositoryFiles(directory: repo.path).openFile(path, writable: false)
        defer { device.close() }
        let size = try device.size()
        guard size == layer.fileSize else {
            throw ChainError(.refused, "layer \(layer.index) is \(size) bytes, the manifest says \(layer.fileSize): it changed since it was recorded; run 'qbackup verify'",
                             path: path)
        }
        var hole: (start: UInt64, length: UInt64)?
        var offset: UInt64 = 0
        while offset < size {
            let dataStart = min(size, device.nextData(from: offset) ?? size)
            if dataStart > offset {
                hole = try extend(hole, offset, dataStart - offset)
                offset = dataStart
                continue
            }
            let dataEnd = min(size, max(offset + 1, device.nextHole(from: offset) ?? size))
            // Pieces end at chunk boundaries, so each is hashed into one chunk at the other end.
            let chunk = UInt64(ReplicationStream.maxDataBytes)
            let end = min(dataEnd, (offset / chunk + 1) * chunk)
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

    private func sendHole(_ hole: (start: UInt64, length: UInt64)) throws {
        var w = ByteWriter()
        w.u64(hole.start)
        w.u64(hole.length)
        try writer.record(.hole, w.bytes)
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
