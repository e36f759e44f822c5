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
/// A fold (a merge at the source) goes the same way up to the flushed file, which it builds from
/// the replica's reference file and the chunks sent; then its record enters the journal and it
/// is switched in (`ReceivedFold`): the replica holds its old points or the source's new ones.
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
        // Read on a thread of its own, so the pipe fills while a record is decoded and written.
        let ahead = try (input as? DescriptorStream).map { try ReadAheadStream($0) }
        defer { ahead?.stop() }
        let reader = StreamReader(ahead ?? input)
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
                let layer: BackupManifest.Layer
                switch try reader.next() {
                case .layer: layer = try receiver.receive(into: &model)
                case .fold: layer = try receiver.receiveFold(into: &model)
                default: throw reader.fail("expected a layer or fold record")
                }
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
    /// Page-aligned, so whole pages written from it can bypass the page cache.
    private let piece = ScratchBuffer()
    private var done: UInt64 = 0

    init(reader: StreamReader, repo: BackupRepository, progress: ((UInt64, UInt64) -> Void)?) {
        self.reader = reader
        self.repo = repo
        self.progress = progress
        _ = piece.reserve(ReplicationStream.maxDataBytes)
    }

    /// One layer: its record, its bytes, its end; recorded in `model` and saved. On any failure
    /// its temporary file is removed and the manifest is as it was before it.
    mutating func receive(into model: inout BackupManifest) throws -> BackupManifest.Layer {
        let announced = try reader.json(BackupManifest.Layer.self, "layer")
        try check(announced, model)
        let before = model
        var m = model
        let names = BackupRepository.namesCreated(forLayer: announced.file)
        m.journal += names.map { BackupManifest.JournalEntry(file: $0) }
        try repo.save(m)
        let temp = repo.file(announced.file + BackupRepository.tempSuffix)
        do {
            let backing = announced.kind == .incremental ? model.layers.last?.file : nil
            let (digest, identity) = try receiveFile(announced, to: temp, backing: backing)
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
        try checkRecord(layer, bad)
        guard layer.index >= repo.nextIndex(of: m) else {
            throw bad("index \(layer.index) does not follow the replica's points (next: \(repo.nextIndex(of: m)))")
        }
        guard m.layers.isEmpty ? layer.kind == .full : true else { throw bad("the first layer of a replica must be full") }
        guard !m.layers.contains(where: { $0.file == layer.file }) else { throw bad("file '\(layer.file)' is already a layer") }
        try checkNameIsFree(layer)
    }

    /// What every record of a point must be: a layer file name, an index, a sha256 and a size in range.
    private func checkRecord(_ layer: BackupManifest.Layer, _ bad: (String) -> ChainError) throws {
        guard BackupManifest.isPlainFileName(layer.file), BackupRepository.isLayerFileName(layer.file) else {
            throw bad("file '\(layer.file)' is not a layer file name")
        }
        guard layer.index >= 0, layer.index < 1 << 40 else { throw bad("index \(layer.index) is out of range") }
        guard BackupManifest.isDigest(layer.sha256) else { throw bad("sha256 is not 64 hex digits") }
        guard layer.fileSize <= ReplicationStream.maxLayerBytes, layer.fileSize > 0 else {
            throw bad("file-size \(layer.fileSize) is out of range")
        }
        guard layer.virtualSize <= QCowHeader.Limits.maxVirtualSize else { throw bad("virtual-size \(layer.virtualSize) is too large") }
    }

    /// A new layer's name is not taken in the folder (a user's file there is never replaced).
    private func checkNameIsFree(_ layer: BackupManifest.Layer) throws {
        if DurableFiles.exists(repo.file(layer.file)) {
            throw ChainError(.refused, "a file named \(layer.file) is already in the folder and is not the replica's; nothing of layer \(layer.index) was written",
                             path: repo.path)
        }
    }

    /// One fold: its record, the new file's bytes against the reference (data, hole and copy
    /// records), its end. The file is built under its temporary name, checked against the
    /// source's sha256 (the digest of its chunk digests) and its qcow2 header, flushed; then the
    /// fold enters the journal and is switched in. Before that, any failure removes the file and
    /// leaves the manifest as it was; after it, the next open of the replica finishes the switch.
    mutating func receiveFold(into model: inout BackupManifest) throws -> BackupManifest.Layer {
        let fold = try reader.json(ReplicationStream.Fold.self, "fold")
        let announced = fold.layer
        let m = model
        func bad(_ message: String) -> ChainError { reader.fail("fold record: \(message)") }
        try checkRecord(announced, bad)
        guard let run = ReceivedFold.run(of: fold.replaces, for: announced, in: m) else {
            throw ChainError(.refused, "the stream does not fit: its fold of point \(announced.index) replaces points \(fold.replaces), which are not a run of the replica's points (\(ReplicationSender.describe(m.layers.map(ReplicationStream.Point.init)))) that it can take the place of",
                             path: repo.path)
        }
        let keepsFile = announced.index == fold.replaces.last
        if !keepsFile {
            guard announced.index >= repo.nextIndex(of: m) else { throw bad("index \(announced.index) was a point of the replica's already") }
            try checkNameIsFree(announced)
        }
        let current = m.layers[run.upperBound - 1]
        if keepsFile && current.sha256 == announced.sha256 {
            // The merge only dropped the points before it: no bytes, the file stays.
            guard try reader.next() == .layerEnd, reader.payloadCount == 32, LayerDigest.hex(reader.payload[0..<32]) == announced.sha256
            else { throw bad("a fold of an unchanged file must end at once with its sha256") }
            var layer = announced
            layer.record(LayerDigest(chunks: current.chunks ?? [], sha256: current.sha256, size: current.fileSize),
                         identity: current.identity)
            var new = m
            new.layers.replaceSubrange(run, with: [layer])
            new.virtualSize = new.layers.last?.virtualSize ?? new.virtualSize
            try new.validate(path: repo.manifestPath)
            try repo.saveDropping(new, files: m.layers[run].dropLast().map(\.file))
            model = repo.manifest ?? new
            return layer
        }
        var referenceLayer: BackupManifest.Layer?
        if let reference = fold.reference {
            guard fold.replaces.contains(reference), let position = m.position(ofIndex: reference) else {
                throw bad("reference \(reference) is not one of the points it replaces")
            }
            referenceLayer = m.layers[position]
        }
        let before = m
        var journaled = m
        let names = BackupRepository.namesCreated(forLayer: announced.file)
        journaled.journal += names.map { BackupManifest.JournalEntry(file: $0) }
        try repo.save(journaled)
        let tempName = announced.file + BackupRepository.tempSuffix
        let temp = repo.file(tempName)
        do {
            let files = RepositoryFiles(directory: repo.path)
            let reference = try referenceLayer.map { try files.openFile(repo.file($0.file), writable: false) }
            defer { reference?.close() }
            let backing = announced.kind == .incremental ? m.layers[run.lowerBound - 1].file : nil
            let (digest, identity) = try receiveFile(announced, to: temp, backing: backing, reference: reference)
            var layer = announced
            layer.record(digest, identity: identity)
            layer.checkpoint = announced.checkpoint
            journaled.receivedFold = ReceivedFold(layer: layer, replaces: fold.replaces, temp: tempName)
            try journaled.validate(path: repo.manifestPath)
            try repo.save(journaled)
        } catch {
            unlink(temp)
            if !(repo.manifest?.layers.contains { $0.file == announced.file } ?? false) && repo.manifest?.receivedFold == nil {
                unlink(repo.file(announced.file))
            }
            if repo.manifest?.receivedFold == nil { try? repo.save(before) }
            throw error
        }
        // Decided: from here a failure is finished by the next open of the replica.
        try ReceivedFold.finish(repo)
        guard let now = repo.manifest, let layer = now.layers.first(where: { $0.index == announced.index }), now.receivedFold == nil
        else { throw ChainError(.io, "the fold of point \(announced.index) could not be switched in", path: repo.path) }
        model = now
        return layer
    }

    /// Writes the layer's bytes to `temp` (created fresh), copy records from `reference`, and
    /// returns their digest and the file's identity.
    private mutating func receiveFile(_ layer: BackupManifest.Layer, to temp: String, backing: String?,
                                      reference: FileDevice? = nil) throws -> (LayerDigest, BackupManifest.Identity)
    {
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.createFresh(temp)), name: temp, writable: true)
        defer { device.close() }
        // Whole pages go to the disk past the page cache: no copy into it, and little left for the fsync.
        device.writeDirectWhenAligned()
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
                    let output = piece.reserve(count)
                    switch ReplicationStream.Encoding(rawValue: encoding) {
                    case .none?:
                        guard body == count else { return false }
                        output.copyMemory(from: input)
                        return true
                    case .lz4?: return LZ4Frames.decompress(input, into: output)
                    case nil: return false
                    }
                }
                guard ok else { throw bad("the data record at offset \(offset) does not decode to \(count) bytes (encoding \(encoding))") }
                let bytes = UnsafeRawBufferPointer(piece.reserve(count))
                hasher.feed(bytes)
                try device.write(bytes, at: offset)
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
            case .copy:
                guard reader.payloadCount == 16 else { throw bad("a copy record is not 16 bytes") }
                var r = ByteReader(Array(reader.payload[0..<16]), region: "copy record")
                let offset = try r.u64()
                let length = try r.u64()
                guard let reference else { throw bad("a copy record in a fold without a reference") }
                guard offset == expected else { throw bad("a copy at offset \(offset), expected \(expected)") }
                let available = try reference.size()
                guard length >= 1, length <= size - offset, offset <= available, length <= available - offset else {
                    throw bad("a copy of \(length) bytes at offset \(offset) does not fit the file of \(size) bytes or the reference of \(available)")
                }
                try copy(offset..<(offset + length), from: reference, to: device, hasher: &hasher)
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
        try checkHeader(layer, device: device, backing: backing)
        try device.sync()
        return (digest, try LayerDigest.identity(of: device))
    }

    /// Bytes of the replica's reference file into the new one at the same offsets, hashed; pieces
    /// of zeros are left unwritten (the new file stays as sparse as the reference).
    private mutating func copy(_ range: Range<UInt64>, from reference: FileDevice, to device: FileDevice,
                               hasher: inout ChunkHasher) throws {
        let grain = 64 << 10
        var offset = range.lowerBound
        while offset < range.upperBound {
            let count = Int(min(range.upperBound - offset, UInt64(ReplicationStream.maxDataBytes)))
            let buffer = piece.reserve(count)
            try reference.readFully(into: buffer, at: offset, region: "reference layer")
            let bytes = UnsafeRawBufferPointer(buffer)
            hasher.feed(bytes)
            // Runs of pieces that are not all zeros, one write each.
            var at = 0
            var run: Int?
            while at <= count {
                let end = min(count, at + grain)
                let zero = at == count || Zeros.isZero(UnsafeRawBufferPointer(rebasing: bytes[at..<end]))
                if zero, let start = run {
                    try device.write(UnsafeRawBufferPointer(rebasing: bytes[start..<at]), at: offset + UInt64(start))
                    run = nil
                } else if !zero && run == nil {
                    run = at
                }
                if at == count { break }
                at = end
            }
            offset += UInt64(count)
        }
    }

    /// The received file is the qcow2 layer its record says: its virtual size, and its backing
    /// file `backing` (the previous layer for an incremental) or none (full).
    private func checkHeader(_ layer: BackupManifest.Layer, device: FileDevice, backing: String?) throws {
        let n = Int(min(layer.fileSize, 65536))
        let header: QCowHeader
        do {
            header = try QCowHeader(decoding: try device.readBytes(n, at: 0, region: "header"))
        } catch let error as CodedError {
            throw ChainError(.invalidFormat, "layer \(layer.index) (\(layer.file)) is not a qcow2 layer: \(error.description)", path: repo.path)
        }
        let expected = backing
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
