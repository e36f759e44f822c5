import CZlib
import FoundationEssentials
import QCowImage

#if canImport(Glibc)
import Glibc
#endif

/// The replication stream (docs/replication-stream.md): a 16-byte preamble, then framed
/// records — a header, per layer its record, its bytes as data and hole records and its end
/// record, and an end record. Every record carries a CRC-32 of its frame header and payload,
/// and every length is checked against a limit of its record type before anything is
/// allocated, so a hostile stream costs bounded memory.
public enum ReplicationStream {
    /// "QBKSTRM" and a zero byte.
    public static let magic: [UInt8] = Array("QBKSTRM".utf8) + [0]
    /// The version a stream with fold records has; one without them is written as version 1,
    /// which a qbackup that knows no folds still reads.
    public static let version: UInt32 = 2
    /// The versions this qbackup reads.
    public static let versions: ClosedRange<UInt32> = 1...2
    /// magic (8), version (4), reserved zero (4).
    public static let preambleSize = 16
    /// type (1), reserved zero (3), payload length (4), CRC-32 (4).
    public static let frameHeaderSize = 12
    /// The most raw bytes one data record carries: one manifest chunk.
    public static let maxDataBytes = BackupManifest.chunkSize
    /// The largest JSON payload (the header names at most `BackupManifest.maxLayers` points).
    public static let maxJSONBytes = 4 << 20
    /// The largest layer file a stream carries (1 TiB, 262144 chunk digests: the manifest of
    /// a replica holds them all, and `BackupManifest.maxBytes` bounds it).
    public static let maxLayerBytes: UInt64 = 1 << 40
    /// A data record's fixed part: offset (8), raw length (4), encoding (1), reserved (3).
    static let dataHeaderSize = 16

    /// Record types (the first byte of a frame).
    public enum RecordType: UInt8, Sendable {
        case header = 1
        case layer = 2
        case data = 3
        case hole = 4
        case layerEnd = 5
        /// Version 2: a merge at the source (the point's new record and the points it replaces).
        case fold = 6
        case end = 7
        /// Version 2, inside a fold: bytes the replica's reference file holds at the same offsets.
        case copy = 8

        /// The largest payload a record of this type may have.
        var maxPayload: Int {
            switch self {
            case .header, .layer, .fold: ReplicationStream.maxJSONBytes
            case .data: ReplicationStream.dataHeaderSize + LZ4Frames.bound(ReplicationStream.maxDataBytes)
            case .hole, .copy: 16
            case .layerEnd: 32
            case .end: 16
            }
        }
    }

    /// How a data record's bytes are encoded.
    public enum Encoding: UInt8, Sendable {
        case none = 0
        /// One complete lz4 frame (content size set; a content checksum optional).
        case lz4 = 1
    }

    /// The stream's compression (`send --compress`).
    public enum Compression: String, Codable, Sendable, CaseIterable { case lz4, none }

    /// The header record: which repository the stream comes from and the points it continues from.
    public struct Header: Codable, Equatable, Sendable {
        /// The source repository (its id, cluster size, disk, bitmap).
        public var repository: LayerSidecar.Repository
        public var virtualSize: UInt64
        /// The source's points the stream continues from, oldest first: the destination must hold
        /// exactly these (by index and sha256) — empty for a stream of the whole repository.
        public var base: [Point]
        /// How many layers and folds follow.
        public var layers: Int
        public var compression: Compression

        enum CodingKeys: String, CodingKey {
            case repository
            case virtualSize = "virtual-size"
            case base, layers, compression
        }
    }

    /// The fold record: the file of point `layer.index` (the source's record, without chunks and
    /// identity) replaces the replica's points `replaces`; the bytes that follow are sent against
    /// the replica's file of point `reference` (copy records for the chunks it already holds).
    public struct Fold: Codable, Equatable, Sendable {
        public var layer: BackupManifest.Layer
        public var replaces: [Int]
        public var reference: Int?
        public init(layer: BackupManifest.Layer, replaces: [Int], reference: Int?) {
            self.layer = layer
            self.replaces = replaces
            self.reference = reference
        }
    }

    /// A point as replication knows it: its stable index and its file's sha256 (as a layer's `sha256`).
    public struct Point: Codable, Equatable, Sendable, CustomStringConvertible {
        public var index: Int
        public var sha256: String
        public init(index: Int, sha256: String) {
            self.index = index
            self.sha256 = sha256
        }
        public init(_ layer: BackupManifest.Layer) { self.init(index: layer.index, sha256: layer.sha256) }
        public var description: String { "\(index) (\(sha256.prefix(12)))" }
    }

    /// CRC-32 (zlib's) of the frame's type, reserved bytes and length, then the payload.
    static func crc(_ head: UnsafeRawBufferPointer, _ payload: UnsafeRawBufferPointer) -> UInt32 {
        var value = crc32(0, nil, 0)
        value = crc32(value, head.bindMemory(to: Bytef.self).baseAddress, uInt(head.count))
        if payload.count > 0 { value = crc32(value, payload.bindMemory(to: Bytef.self).baseAddress, uInt(payload.count)) }
        return UInt32(truncatingIfNeeded: value)
    }

    /// One framed record as bytes (tests and fuzz seeds craft streams with it).
    public static func frame(_ type: UInt8, _ payload: [UInt8]) -> [UInt8] {
        var head = ByteWriter()
        head.u8(type)
        head.zeros(3)
        head.u32(UInt32(truncatingIfNeeded: payload.count))
        let value: UInt32 = head.bytes.withUnsafeBytes { h in payload.withUnsafeBytes { p in crc(h, p) } }
        head.u32(value)
        return head.bytes + payload
    }

    /// The preamble of a stream of `version`.
    public static func preamble(version: UInt32 = version) -> [UInt8] {
        var w = ByteWriter()
        w.append(magic)
        w.u32(version)
        w.u32(0)
        return w.bytes
    }

    /// The records of a well-formed stream, in order: each one's type and byte range (frame
    /// header included). Stops at the first frame that does not fit in `bytes`.
    public static func records(in bytes: [UInt8]) -> [(type: UInt8, range: Range<Int>)] {
        var out: [(type: UInt8, range: Range<Int>)] = []
        var at = preambleSize
        while at + frameHeaderSize <= bytes.count {
            let length = bytes[(at + 4)..<(at + 8)].reduce(0) { $0 << 8 | Int($1) }
            let end = at + frameHeaderSize + length
            guard end <= bytes.count else { break }
            out.append((bytes[at], at..<end))
            at = end
        }
        return out
    }

    /// The length of the first stream in `bytes` (through its end record; all of `bytes` when it
    /// has none): the fuzz target and its tests receive the streams of one input one after another.
    public static func firstStreamLength(in bytes: [UInt8]) -> Int {
        records(in: bytes).first { $0.type == RecordType.end.rawValue }?.range.upperBound ?? bytes.count
    }

    static var encoder: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }
}

// MARK: - Byte channels

/// Where a stream is read from: stdin, a pipe, memory (tests, fuzzing).
public protocol StreamInput: AnyObject {
    /// Reads up to `buffer.count` bytes; 0 at the end of the stream.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
}

/// Where a stream is written to.
public protocol StreamOutput: AnyObject {
    func write(_ bytes: UnsafeRawBufferPointer) throws
}

/// A stream on a file descriptor (stdin, stdout, a pipe); not closed by this type.
public final class DescriptorStream: StreamInput, StreamOutput {
    /// How a failed write's message begins (the reader went away).
    static let writeFailure = "cannot write the stream"
    public let fd: Int32
    let name: String
    public init(fd: Int32, name: String) {
        self.fd = fd
        self.name = name
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw ChainError(.io, "cannot read the stream from \(name): \(String(cString: strerror(errno)))")
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress.map { $0 + done }, bytes.count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let reason = errno == EPIPE ? "the reader went away (broken pipe)" : String(cString: strerror(errno))
                throw ChainError(.io, "\(Self.writeFailure) to \(name): \(reason)")
            }
            done += n
        }
    }
}

/// A stream in memory (tests, the fuzz target).
public final class MemoryStream: StreamInput, StreamOutput {
    public private(set) var bytes: [UInt8]
    private var position = 0
    public init(_ bytes: [UInt8] = []) { self.bytes = bytes }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, bytes.count - position)
        guard n > 0 else { return 0 }
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position..<(position + n)])) }
        position += n
        return n
    }

    public func write(_ more: UnsafeRawBufferPointer) throws { bytes.append(contentsOf: more) }
}

// MARK: - Framing

/// Writes the preamble and framed records; counts the bytes written.
final class StreamWriter {
    private let output: StreamOutput
    private(set) var bytesWritten: UInt64 = 0

    init(_ output: StreamOutput) { self.output = output }

    func preamble(version: UInt32) throws { try emit(ReplicationStream.preamble(version: version)) }

    /// One record: frame header (type, reserved, length, CRC-32), then `payload`.
    func record(_ type: ReplicationStream.RecordType, _ payload: UnsafeRawBufferPointer) throws {
        precondition(payload.count <= type.maxPayload, "a \(type) record of \(payload.count) bytes")
        var head = ByteWriter()
        head.u8(type.rawValue)
        head.zeros(3)
        head.u32(UInt32(payload.count))
        let crc = head.bytes.withUnsafeBytes { ReplicationStream.crc($0, payload) }
        head.u32(crc)
        try emit(head.bytes)
        try output.write(payload)
        bytesWritten += UInt64(payload.count)
    }

    func record(_ type: ReplicationStream.RecordType, _ payload: [UInt8]) throws {
        try payload.withUnsafeBytes { try record(type, $0) }
    }

    func json<T: Encodable>(_ type: ReplicationStream.RecordType, _ value: T) throws {
        let data = try ReplicationStream.encoder.encode(value)
        try record(type, Array(data))
    }

    private func emit(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try output.write($0) }
        bytesWritten += UInt64(bytes.count)
    }
}

/// Reads the preamble and framed records through a read-ahead buffer, checking each frame's
/// length against its type's limit before reading the payload, and its CRC-32 after.
final class StreamReader {
    private let input: StreamInput
    private var buffer: [UInt8]
    private var start = 0
    private var end = 0
    /// Bytes consumed so far: the stream offset of the next byte, for error messages.
    private(set) var offset: UInt64 = 0
    /// The payload of the last record read (valid until the next read).
    private(set) var payload: [UInt8]
    private(set) var payloadCount = 0
    /// The stream's version (from its preamble).
    private(set) var version: UInt32 = 0

    init(_ input: StreamInput) {
        self.input = input
        buffer = [UInt8](repeating: 0, count: 1 << 20)
        payload = []
    }

    func fail(_ message: String) -> ChainError {
        ChainError(.invalidFormat, "replication stream at byte \(offset): \(message)")
    }

    /// Fills `into` completely, or throws `truncated` naming `what`.
    private func readExactly(_ into: UnsafeMutableRawBufferPointer, _ what: String) throws {
        var got = 0
        while got < into.count {
            if start == end {
                // Large reads go straight to the destination; small ones through the buffer.
                if into.count - got >= buffer.count {
                    let n = try input.read(into: UnsafeMutableRawBufferPointer(rebasing: into[got...]))
                    guard n > 0 else { throw truncated(what) }
                    got += n
                    offset += UInt64(n)
                    continue
                }
                let n = try buffer.withUnsafeMutableBytes { try input.read(into: $0) }
                guard n > 0 else { throw truncated(what) }
                start = 0
                end = n
            }
            let take = min(end - start, into.count - got)
            buffer.withUnsafeBytes {
                UnsafeMutableRawBufferPointer(rebasing: into[got..<(got + take)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<(start + take)]))
            }
            start += take
            got += take
            offset += UInt64(take)
        }
    }

    private func truncated(_ what: String) -> ChainError {
        ChainError(.truncated, "replication stream at byte \(offset): the stream ends inside \(what) (cut short?)")
    }

    func preamble() throws {
        var head = [UInt8](repeating: 0, count: ReplicationStream.preambleSize)
        try head.withUnsafeMutableBytes { try readExactly($0, "the preamble") }
        guard Array(head[0..<8]) == ReplicationStream.magic else {
            throw ChainError(.invalidFormat, "the input is not a qbackup replication stream (no 'QBKSTRM' magic)")
        }
        var r = ByteReader(head, region: "stream preamble")
        try r.skip(8)
        let version = try r.u32()
        let versions = ReplicationStream.versions
        guard versions.contains(version) else {
            throw ChainError(.unsupported, "replication stream version \(version) is not supported (this qbackup reads versions \(versions.lowerBound) to \(versions.upperBound))")
        }
        guard try r.u32() == 0 else { throw fail("reserved preamble bytes are not zero") }
        self.version = version
    }

    /// The next record's type; its payload is in `payload[0..<payloadCount]`.
    func next() throws -> ReplicationStream.RecordType {
        var head = [UInt8](repeating: 0, count: ReplicationStream.frameHeaderSize)
        try head.withUnsafeMutableBytes { try readExactly($0, "a record header") }
        let at = offset - UInt64(head.count)
        guard let type = ReplicationStream.RecordType(rawValue: head[0]), version >= 2 || (type != .fold && type != .copy) else {
            throw ChainError(.invalidFormat, "replication stream at byte \(at): unknown record type \(head[0])")
        }
        guard head[1] == 0, head[2] == 0, head[3] == 0 else {
            throw ChainError(.invalidFormat, "replication stream at byte \(at): reserved record bytes are not zero")
        }
        var r = ByteReader(head, region: "record header")
        try r.skip(4)
        let length = Int(try r.u32())
        let expected = try r.u32()
        guard length <= type.maxPayload else {
            throw ChainError(.invalidFormat, "replication stream at byte \(at): a \(type) record of \(length) bytes is longer than the limit of \(type.maxPayload)")
        }
        if payload.count < length { payload = [UInt8](repeating: 0, count: max(length, min(type.maxPayload, 64 << 10))) }
        try payload.withUnsafeMutableBytes { try readExactly(UnsafeMutableRawBufferPointer(rebasing: $0[0..<length]), "a \(type) record") }
        payloadCount = length
        let crc = head.withUnsafeBytes { h in
            payload.withUnsafeBytes { ReplicationStream.crc(UnsafeRawBufferPointer(rebasing: h[0..<8]), UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
        }
        guard crc == expected else {
            throw ChainError(.corrupt, "replication stream at byte \(at): the \(type) record's CRC-32 does not match (the stream is damaged)")
        }
        return type
    }

    /// The payload decoded as JSON of type `T`.
    func json<T: Decodable>(_ type: T.Type, _ what: String) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(payload[0..<payloadCount]))
        } catch let error as DecodingError {
            throw fail("the \(what) record is not valid: \(BackupManifest.describe(error))")
        } catch {
            throw fail("the \(what) record is not valid JSON")
        }
    }
}
