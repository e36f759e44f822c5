import Crypto
import FoundationEssentials
import Logging
import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `qbackup receive`: reads a replication stream into a replica (a new folder, or a replica of
/// the same repository whose points are exactly those the stream continues from).
///
/// Nothing is written before the header has been checked against the destination: a stream
/// of another repository, or one that does not fit its points, changes nothing. Then each
/// layer, in backup's order (DESIGN.md, and `BackupEngine`):
/// 1. its names are journaled in the manifest; its bytes go to `NAME.partial`, hashed in
///    4 MiB chunks as they arrive;
/// 2. at its end record: size, sha256 (against the record, and the record's against the end
///    record), qcow2 header (backing file, virtual size) checked, fsynced, renamed to NAME;
/// 3. its sidecar, then the manifest listing it.
/// A cut or damaged stream loses only the layer it was in: its temporary file is removed and
/// the journal restored, so the replica is as before plus the complete layers.
public enum ReplicationReceiver {
    public struct Result: Sendable {
        /// The indices of the layers received.
        public var layers: [Int]
        /// The received layer files' bytes.
        public var fileBytes: UInt64
        /// Bytes of the stream read.
        public var streamBytes: UInt64
        /// The source repository's id.
        public var replicaOf: String
    }

    /// Receives the stream on `input` into the repository folder `repository`.
    public static func receive(repository: String, from input: StreamInput, wait: Double = 0,
                               logger: Logger = Logger(label: "qbackup.receive"),
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        let reader = StreamReader(input)
        try reader.preamble()
        guard try reader.next() == .header else { throw reader.fail("the stream does not begin with a header record") }
        let header = try reader.json(ReplicationStream.Header.self, "header")
        var model = try validate(header, path: repository)

        let exists = DurableFiles.exists(repository)
        if !exists && (!header.base.isEmpty || header.layers == 0) {
            guard header.base.isEmpty else {
                throw ChainError(.refused, "the destination holds no points, the stream continues from \(ReplicationSender.describe(header.base)); send the whole repository (without --after or --have)",
                                 path: repository)
            }
            return try finish(reader, header: header, received: [], bytes: 0)
        }
        let repo = try BackupRepository(path: repository, create: true, exclusive: true, wait: wait)
        var received: [Int] = []
        var bytes: UInt64 = 0
        do {
            try repo.requireIntact()
            if let m = repo.manifest {
                try fits(header, m, path: repository)
                try repo.removeLeftovers()
                model = repo.manifest ?? m
            } else if !header.base.isEmpty {
                throw ChainError(.refused, "the destination holds no points, the stream continues from \(ReplicationSender.describe(header.base)); send the whole repository (without --after or --have)",
                                 path: repository)
            }
            let total = header.layers
            var receiver = LayerReceiver(reader: reader, repo: repo, progress: progress)
            for _ in 0..<total {
                let layer = try receiver.receive(into: &model)
                received.append(layer.index)
                bytes += layer.fileSize
                logger.debug("received layer", metadata: ["index": "\(layer.index)", "file": "\(layer.file)"])
            }
        } catch {
            repo.removeIfUnused()
            throw error
        }
        return try finish(reader, header: header, received: received, bytes: bytes)
    }

    /// The end record: it counts the layers the header announced.
    private static func finish(_ reader: StreamReader, header: ReplicationStream.Header, received: [Int],
                               bytes: UInt64) throws -> Result {
        guard try reader.next() == .end else { throw reader.fail("expected the end record after \(header.layers) layer(s)") }
        var r = ByteReader(Array(reader.payload[0..<reader.payloadCount]), region: "end record")
        guard reader.payloadCount == 16, try r.u64() == UInt64(header.layers), try r.u64() == 0 else {
            throw reader.fail("the end record does not count the \(header.layers) layer(s) the header announced")
        }
        return Result(layers: received, fileBytes: bytes, streamBytes: reader.offset, replicaOf: header.repository.id)
    }

    /// The replica's manifest model the header describes (validated as a manifest), with no layers yet.
    static func validate(_ header: ReplicationStream.Header, path: String) throws -> BackupManifest {
        let r = header.repository
        var m = BackupManifest(id: BackupRepository.newID(), virtualSize: header.virtualSize, clusterSize: r.clusterSize,
                               bitmap: r.bitmap, source: r.source)
        m.replicaOf = r.id
        do {
            try m.validate(path: path)
        } catch let error as ChainError {
            throw ChainError(.invalidFormat, "replication stream header: \(error.message)", path: path)
        }
        guard header.layers >= 0, header.layers <= BackupManifest.maxLayers, header.base.count <= BackupManifest.maxLayers else {
            throw ChainError(.invalidFormat, "replication stream header: \(header.layers) layers is out of range", path: path)
        }
        for (i, point) in header.base.enumerated() {
            guard BackupManifest.isDigest(point.sha256), point.index >= 0, point.index < 1 << 40,
                  i == 0 || point.index > header.base[i - 1].index
            else { throw ChainError(.invalidFormat, "replication stream header: base point \(i) is not valid", path: path) }
        }
        return m
    }

    /// Refuses a stream that is not of this replica's repository or does not continue its points.
    static func fits(_ header: ReplicationStream.Header, _ m: BackupManifest, path: String) throws {
        guard let origin = m.replicaOf else {
            throw ChainError(.refused, "the destination is a repository of its own (id \(m.id)), not a replica; receive into a new folder or a replica",
                             path: path)
        }
        guard origin == header.repository.id else {
            throw ChainError(.refused, "the destination is a replica of repository \(origin); the stream is of repository \(header.repository.id)",
                             path: path)
        }
        guard m.source == header.repository.source, m.clusterSize == header.repository.clusterSize else {
            throw ChainError(.refused, "the destination's disk or cluster size differs from the stream's repository", path: path)
        }
        let points = m.layers.map(ReplicationStream.Point.init)
        guard points == header.base else {
            throw ChainError(.refused, "the stream does not fit: the replica holds points \(ReplicationSender.describe(points)), the stream continues from \(ReplicationSender.describe(header.base)); nothing was changed",
                             path: path)
        }
    }
}

/// Receives layers through reusable 4 MiB buffers.
struct LayerReceiver {
    let reader: StreamReader
    let repo: BackupRepository
    let progress: ((UInt64, UInt64) -> Void)?
    private var piece: [UInt8]
    private var done: UInt64 = 0

    init(reader: StreamReader, repo: BackupRepository, progress: ((UInt64, UInt64) -> Void)?) {
        self.reader = reader
        self.repo = repo
        self.progress = progress
        piece = [UInt8](repeating: 0, count: ReplicationStream.maxDataBytes)
    }

    /// One layer: its record, its bytes, its end; recorded in `model` and saved. On any failure
    /// its temporary file is removed and the manifest is as it was before it.
    mutating func receive(into model: inout BackupManifest) throws -> BackupManifest.Layer {
        guard try reader.next() == .layer else { throw reader.fail("expected a layer record") }
        let announced = try reader.json(BackupManifest.Layer.self, "layer")
        try check(announced, model)
        let before = model
        var m = model
        let names = BackupRepository.namesCreated(forLayer: announced.file)
        m.journal += names.map { BackupManifest.JournalEntry(file: $0) }
        try repo.save(m)
        let temp = repo.file(announced.file + BackupRepository.tempSuffix)
        do {
            let (digest, identity) = try receiveFile(announced, to: temp)
            try DurableFiles.rename(temp, to: repo.file(announced.file))
            var layer = announced
            layer.record(digest, identity: identity)
            layer.checkpoint = announced.checkpoint
            m.layers.append(layer)
            m.virtualSize = layer.virtualSize
            m.journal.removeAll { $0.file.map(names.contains) ?? false }
            try m.validate(path: repo.manifestPath)
            try repo.save(m)
            model = m
            return layer
        } catch {
            unlink(temp)
            if !(repo.manifest?.layers.contains { $0.file == announced.file } ?? false) {
                unlink(repo.file(announced.file))
                try? repo.save(before)
            }
            throw error
        }
    }

    /// The layer record before anything of it is written: a plain new name, the next index, a
    /// size within the limits, a full first layer.
    private func check(_ layer: BackupManifest.Layer, _ m: BackupManifest) throws {
        func bad(_ message: String) -> ChainError { reader.fail("layer record: \(message)") }
        guard BackupManifest.isPlainFileName(layer.file), BackupRepository.isLayerFileName(layer.file) else {
            throw bad("file '\(layer.file)' is not a layer file name")
        }
        guard layer.index >= repo.nextIndex(of: m), layer.index < 1 << 40 else {
            throw bad("index \(layer.index) does not follow the replica's points (next: \(repo.nextIndex(of: m)))")
        }
        guard BackupManifest.isDigest(layer.sha256) else { throw bad("sha256 is not 64 hex digits") }
        guard layer.fileSize <= ReplicationStream.maxLayerBytes, layer.fileSize > 0 else {
            throw bad("file-size \(layer.fileSize) is out of range")
        }
        guard m.layers.isEmpty ? layer.kind == .full : true else { throw bad("the first layer of a replica must be full") }
        guard !m.layers.contains(where: { $0.file == layer.file }) else { throw bad("file '\(layer.file)' is already a layer") }
        if DurableFiles.exists(repo.file(layer.file)) {
            throw ChainError(.refused, "a file named \(layer.file) is already in the folder and is not the replica's; nothing of layer \(layer.index) was written",
                             path: repo.path)
        }
    }

    /// Writes the layer's bytes to `temp` (created fresh) and returns their digest and the file's identity.
    private mutating func receiveFile(_ layer: BackupManifest.Layer, to temp: String) throws
        -> (LayerDigest, BackupManifest.Identity)
    {
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.createFresh(temp)), name: temp, writable: true)
        defer { device.close() }
        var hasher = ChunkHasher()
        var expected: UInt64 = 0
        let size = layer.fileSize
        func bad(_ message: String) -> ChainError { reader.fail("layer \(layer.index): \(message)") }
        loop: while true {
            switch try reader.next() {
            case .data:
                guard reader.payloadCount >= ReplicationStream.dataHeaderSize else { throw bad("a data record is too short") }
                var r = ByteReader(Array(reader.payload[0..<ReplicationStream.dataHeaderSize]), region: "data record")
                let offset = try r.u64()
                let count = Int(try r.u32())
                let encoding = try r.u8()
                guard try r.u8() == 0, try r.u16() == 0 else { throw bad("reserved data record bytes are not zero") }
                guard offset == expected else { throw bad("data at offset \(offset), expected \(expected)") }
                guard count >= 1, count <= ReplicationStream.maxDataBytes, UInt64(count) <= size - offset else {
                    throw bad("a data record of \(count) bytes at offset \(offset) does not fit the file of \(size) bytes")
                }
                let body = reader.payloadCount - ReplicationStream.dataHeaderSize
                let ok: Bool = reader.payload.withUnsafeBytes { p in
                    let input = UnsafeRawBufferPointer(rebasing: p[ReplicationStream.dataHeaderSize..<reader.payloadCount])
                    return piece.withUnsafeMutableBytes { out in
                        let output = UnsafeMutableRawBufferPointer(rebasing: out[0..<count])
                        switch ReplicationStream.Encoding(rawValue: encoding) {
                        case .none?:
                            guard body == count else { return false }
                            output.copyMemory(from: input)
                            return true
                        case .lz4?: return LZ4Frames.decompress(input, into: output)
                        case nil: return false
                        }
                    }
                }
                guard ok else { throw bad("the data record at offset \(offset) does not decode to \(count) bytes (encoding \(encoding))") }
                try piece.withUnsafeBytes {
                    let bytes = UnsafeRawBufferPointer(rebasing: $0[0..<count])
                    hasher.feed(bytes)
                    try device.write(bytes, at: offset)
                }
                expected += UInt64(count)
                done += UInt64(count)
            case .hole:
                guard reader.payloadCount == 16 else { throw bad("a hole record is not 16 bytes") }
                var r = ByteReader(Array(reader.payload[0..<16]), region: "hole record")
                let offset = try r.u64()
                let length = try r.u64()
                guard offset == expected else { throw bad("a hole at offset \(offset), expected \(expected)") }
                guard length >= 1, length <= size - offset else {
                    throw bad("a hole of \(length) bytes at offset \(offset) does not fit the file of \(size) bytes")
                }
                hasher.feedZeros(length)
                expected += length
                done += length
            case .layerEnd:
                guard expected == size else { throw bad("the layer ends at byte \(expected) of its \(size)") }
                guard reader.payloadCount == 32, LayerDigest.hex(reader.payload[0..<32]) == layer.sha256 else {
                    throw bad("the end record's sha256 differs from the layer record's")
                }
                break loop
            case let other:
                throw bad("a \(other) record inside the layer's bytes")
            }
            progress?(done, done)
        }
        let digest = hasher.finish(size: size)
        guard digest.sha256 == layer.sha256 else {
            throw ChainError(.corrupt, "layer \(layer.index) (\(layer.file)): the bytes received do not match the source's sha256; the source's file may be damaged (run 'qbackup verify' there); nothing of it was recorded",
                             path: repo.path)
        }
        try device.resize(to: size)
        try checkHeader(layer, device: device)
        try device.sync()
        return (digest, try LayerDigest.identity(of: device))
    }

    /// The received file is the qcow2 layer its record says: its virtual size, and its backing
    /// file the previous layer (incremental) or none (full).
    private func checkHeader(_ layer: BackupManifest.Layer, device: FileDevice) throws {
        let n = Int(min(layer.fileSize, 65536))
        let header: QCowHeader
        do {
            header = try QCowHeader(decoding: try device.readBytes(n, at: 0, region: "header"))
        } catch let error as CodedError {
            throw ChainError(.invalidFormat, "layer \(layer.index) (\(layer.file)) is not a qcow2 layer: \(error.description)", path: repo.path)
        }
        let previous = repo.manifest?.layers.last?.file
        let expected = layer.kind == .incremental ? previous : nil
        guard header.backingFile == expected, header.size == layer.virtualSize else {
            throw ChainError(.invalidFormat, "layer \(layer.index) (\(layer.file)) has backing file \(header.backingFile ?? "none") and size \(header.size); the record says \(expected ?? "none") and \(layer.virtualSize)",
                             path: repo.path)
        }
    }
}

/// SHA-256 of each 4 MiB chunk of a file whose bytes arrive in order.
struct ChunkHasher {
    private var current = SHA256()
    private var inChunk = 0
    private(set) var chunks: [String] = []

    mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        var at = 0
        while at < bytes.count {
            let take = min(bytes.count - at, BackupManifest.chunkSize - inChunk)
            current.update(bufferPointer: UnsafeRawBufferPointer(rebasing: bytes[at..<(at + take)]))
            at += take
            inChunk += take
            if inChunk == BackupManifest.chunkSize { close() }
        }
    }

    /// The digest of a 4 MiB chunk of zeros: a hole over a whole chunk costs no hashing.
    static let zeroChunk: String = {
        var hasher = SHA256()
        var left = BackupManifest.chunkSize
        while left > 0 {
            let n = min(left, Zeros.buffer.count)
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: Zeros.buffer[0..<n]))
            left -= n
        }
        return LayerDigest.hex(hasher.finalize())
    }()

    mutating func feedZeros(_ count: UInt64) {
        var left = count
        while left > 0 {
            if inChunk == 0 && left >= UInt64(BackupManifest.chunkSize) {
                chunks.append(Self.zeroChunk)
                left -= UInt64(BackupManifest.chunkSize)
                continue
            }
            let n = Int(min(left, UInt64(Zeros.buffer.count)))
            feed(UnsafeRawBufferPointer(rebasing: Zeros.buffer[0..<n]))
            left -= UInt64(n)
        }
    }

    private mutating func close() {
        chunks.append(LayerDigest.hex(current.finalize()))
        current = SHA256()
        inChunk = 0
    }

    mutating func finish(size: UInt64) -> LayerDigest {
        if inChunk > 0 { close() }
        return LayerDigest(chunks: chunks, sha256: LayerDigest.combine(chunks), size: size)
    }
}
