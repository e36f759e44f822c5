import Crypto
import Dispatch
import FoundationEssentials
import QCowImage
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The digest of a layer file as the manifest records it: the SHA-256 of each 4 MiB chunk
/// (`BackupManifest.chunkSize`) and `sha256`, the SHA-256 of the chunk digests' 32-byte values
/// in order. One read of the file gives both, at the cost of one whole-file hash; a merge or a
/// check can then re-hash just the chunks it touches (`mismatchedChunks`).
public struct LayerDigest: Equatable, Sendable {
    public var chunks: [String]
    public var sha256: String
    public var size: UInt64
    /// SHA-256 of the whole file, when asked for (to check a version 1 manifest's record).
    public var fileSHA256: String?

    public init(chunks: [String], sha256: String, size: UInt64, fileSHA256: String? = nil) {
        self.chunks = chunks
        self.sha256 = sha256
        self.size = size
        self.fileSHA256 = fileSHA256
    }

    /// How many chunks a file of `size` bytes has.
    public static func chunkCount(of size: UInt64) -> Int {
        Int((size + UInt64(BackupManifest.chunkSize) - 1) / UInt64(BackupManifest.chunkSize))
    }

    /// `sha256` of the given chunk digests (hex); nil-safe for malformed hex (hashes what parses).
    public static func combine(_ chunks: [String]) -> String {
        var hasher = SHA256()
        for chunk in chunks { hasher.update(data: bytes(ofHex: chunk)) }
        return hex(hasher.finalize())
    }

    /// Hashes every chunk of `device`; with `wholeFile`, the whole file's SHA-256 as well.
    public static func compute(_ device: BlockDevice, wholeFile: Bool = false) throws -> LayerDigest {
        var whole = wholeFile ? SHA256() : nil
        var chunks: [String] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset: UInt64 = 0
        var chunk = SHA256()
        var inChunk = 0
        while true {
            let n = try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: offset) }
            if n == 0 { break }
            var at = 0
            while at < n {
                let take = min(n - at, BackupManifest.chunkSize - inChunk)
                buffer.withUnsafeBytes { raw in
                    let piece = UnsafeRawBufferPointer(rebasing: raw[at..<(at + take)])
                    chunk.update(bufferPointer: piece)
                    whole?.update(bufferPointer: piece)
                }
                at += take
                inChunk += take
                if inChunk == BackupManifest.chunkSize {
                    chunks.append(hex(chunk.finalize()))
                    chunk = SHA256()
                    inChunk = 0
                }
            }
            offset += UInt64(n)
        }
        if inChunk > 0 { chunks.append(hex(chunk.finalize())) }
        return LayerDigest(chunks: chunks, sha256: combine(chunks), size: offset, fileSHA256: whole.map { hex($0.finalize()) })
    }

    /// Hashes the file at `path` (a regular file inside the repository, never through a symlink).
    static func compute(path: String, wholeFile: Bool = false) throws -> (LayerDigest, BackupManifest.Identity) {
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.openRegular(path, flags: O_RDONLY)),
                                name: path, writable: false)
        defer { device.close() }
        let digest = try compute(device, wholeFile: wholeFile)
        return (digest, try identity(of: device))
    }

    /// The digest of the file at `path` after a change in place (of a file of `oldSize` bytes,
    /// every write noted in `writes`): the chunks it changed are hashed from the file, every
    /// other one keeps its digest from `recorded` — the record of the file before the change,
    /// which the caller checked against the file first (`problem`). Returns how many chunks
    /// were hashed too.
    static func update(path: String, recorded: [String], oldSize: UInt64, writes: WriteLog) throws
        -> (digest: LayerDigest, identity: BackupManifest.Identity, hashed: Int)
    {
        let device = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.openRegular(path, flags: O_RDONLY)),
                                name: path, writable: false)
        defer { device.close() }
        let size = try device.size()
        let count = chunkCount(of: size)
        let changed = writes.changedChunks(oldSize: oldSize, newSize: size)
        var chunks = Array(recorded.prefix(count))
        while chunks.count < count { chunks.append("") }
        let hash = changed.union(recorded.count..<max(recorded.count, count)).filter { $0 < count }.sorted()
        var buffer = [UInt8](repeating: 0, count: BackupManifest.chunkSize)
        for number in hash {
            guard let digest = try chunkDigest(number, of: device, size: size, buffer: &buffer) else {
                throw ChainError(.io, "the file changed size while it was hashed", path: path)
            }
            chunks[number] = digest
        }
        return (LayerDigest(chunks: chunks, sha256: combine(chunks), size: size), try identity(of: device), hash.count)
    }

    /// The SHA-256 (hex) of chunk `number` of a device of `size` bytes, or nil when fewer bytes read.
    private static func chunkDigest(_ number: Int, of device: BlockDevice, size: UInt64, buffer: inout [UInt8]) throws -> String? {
        let start = UInt64(number) * UInt64(BackupManifest.chunkSize)
        let expected = Int(min(UInt64(BackupManifest.chunkSize), size - min(size, start)))
        var got = 0
        while got < expected {
            let n = try buffer.withUnsafeMutableBytes {
                try device.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[got..<expected]), at: start + UInt64(got))
            }
            if n == 0 { break }
            got += n
        }
        guard got == expected else { return nil }
        return buffer.withUnsafeBytes { hex(SHA256.hash(data: UnsafeRawBufferPointer(rebasing: $0[0..<got]))) }
    }

    /// The chunks (by number) of `device` whose digests differ from `layer`'s record — only
    /// those in `numbers` are read. A layer without recorded chunks (version 1) has every
    /// asked chunk reported. A chunk past the end of the file counts as differing.
    public static func mismatchedChunks(_ numbers: [Int], of device: BlockDevice, layer: BackupManifest.Layer) throws -> [Int] {
        guard let recorded = layer.chunks else { return numbers }
        var bad: [Int] = []
        var buffer = [UInt8](repeating: 0, count: BackupManifest.chunkSize)
        for number in numbers {
            guard number >= 0, number < recorded.count else {
                bad.append(number)
                continue
            }
            let digest = try chunkDigest(number, of: device, size: layer.fileSize, buffer: &buffer)
            if digest != recorded[number] { bad.append(number) }
        }
        return bad
    }

    /// Whether the file of `device` still matches `layer`'s record: size and every chunk.
    /// Returns the first problem in words, or nil. A version 1 record is checked whole.
    static func problem(_ device: BlockDevice, layer: BackupManifest.Layer) throws -> String? {
        try mismatch(device, layer: layer)?.message
    }

    /// As `problem`, with the file offset of the first 4 MiB chunk that differs (when chunks were recorded).
    static func mismatch(_ device: BlockDevice, layer: BackupManifest.Layer) throws -> (message: String, offset: UInt64?)? {
        let digest = try compute(device, wholeFile: layer.chunks == nil)
        if let problem = sizeProblem(digest.size, layer: layer) { return (problem, nil) }
        guard let recorded = layer.chunks else {
            return digest.fileSHA256 == layer.sha256 ? nil
                : ("checksum mismatch: sha256 is \(digest.fileSHA256 ?? ""), the manifest says \(layer.sha256)", nil)
        }
        let bad = zip(digest.chunks, recorded).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
        guard bad.isEmpty, digest.sha256 == layer.sha256 else {
            return (chunkProblem(bad), bad.first.map { UInt64($0) * UInt64(BackupManifest.chunkSize) })
        }
        return nil
    }

    /// The words for a file of `size` bytes where `layer` records another size; nil when they agree.
    static func sizeProblem(_ size: UInt64, layer: BackupManifest.Layer) -> String? {
        size == layer.fileSize ? nil : "file is \(size) bytes, the manifest says \(layer.fileSize)"
    }

    /// The words for the 4 MiB chunks (by number, ascending) that do not match their recorded digests.
    static func chunkProblem(_ bad: [Int]) -> String {
        let offsets = bad.prefix(8).map { "0x\(String(UInt64($0) * UInt64(BackupManifest.chunkSize), radix: 16))" }
        return "checksum mismatch in \(bad.count) chunk(s) of 4 MiB at file offset(s) \(offsets.joined(separator: ", "))"
    }

    /// The identity (inode, size, mtime) of an open file.
    static func identity(of device: FileDevice) throws -> BackupManifest.Identity {
        var st = stat()
        guard fstat(device.descriptor.rawValue, &st) == 0 else {
            throw ChainError(.io, "cannot stat: \(String(cString: strerror(errno)))", path: device.name)
        }
        return identity(st)
    }

    static func identity(_ st: stat) -> BackupManifest.Identity {
        BackupManifest.Identity(inode: UInt64(st.st_ino), size: UInt64(st.st_size),
                                mtime: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
    }

    static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(64)
        for byte in digest {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func bytes(ofHex text: String) -> [UInt8] {
        var out = [UInt8]()
        var high: UInt8?
        for c in text.utf8 {
            let v: UInt8
            switch c {
            case 0x30...0x39: v = c - 0x30
            case 0x61...0x66: v = c - 0x61 + 10
            case 0x41...0x46: v = c - 0x41 + 10
            default: continue
            }
            if let h = high {
                out.append(h << 4 | v)
                high = nil
            } else {
                high = v
            }
        }
        return out
    }
}
