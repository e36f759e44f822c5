#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What the copier does with a unit of the plan (a cluster of the output) that reads as zeros.
public enum ZeroPolicy: Sendable, Equatable {
    /// Make it read as zeros in the output without data: a zero cluster (over a backing
    /// file, or an image holding other data there: a layer, a commit).
    case hide
    /// Leave it alone: a new standalone image or raw file reads as zeros there anyway.
    case skip
    /// Write the zero bytes (a block device or stream whose old contents must all go).
    case write
}

/// Where the copier writes.
public enum CopyOutput {
    /// A writable image (a new qcow2 file, or the backing file a commit writes into).
    case image(WritableImage)
    /// A raw file or device, guest offset = file offset; a `stream` (stdout) is written
    /// front to back with write(2).
    case raw(FileDevice, stream: Bool)
}

/// How the copier runs.
public struct CopyOptions: Sendable {
    public var zeros: ZeroPolicy
    /// Compress every whole data cluster with the qcow2 output's codec (on `workers` threads).
    public var compress = false
    /// Bytes read per chunk (rounded down to whole grains of the plan).
    public var chunkBytes = 4 << 20
    public var workers = max(1, System.coreCount)
    public init(zeros: ZeroPolicy, compress: Bool = false) {
        self.zeros = zeros
        self.compress = compress
    }
}

/// What the copier did.
public struct CopyResult: Sendable, Equatable {
    /// Guest bytes written as data (before compression).
    public var dataBytes: UInt64 = 0
    /// Guest bytes of the plan that read as zeros (hidden, skipped or written as the policy said).
    public var zeroBytes: UInt64 = 0
    /// Distinct threads that compressed at least one cluster (0 without compression).
    public var compressionThreads = 0
    public init() {}
}

/// The one copy loop: every command that writes guest data into an image (flatten, restore,
/// a backup layer, a merged layer, commit) copies a `CopyPlan` from a `GuestReader` with it.
///
/// Three stages overlap, each on its own thread, through reusable page-aligned buffers
/// (`WriteBehind`): this thread reads a chunk (several MiB, one positional read per plan
/// range piece) and finds its zero clusters; a second compresses the chunk's data clusters
/// on every core (`CompressionPool`); a third writes the chunk in order — runs of plain
/// clusters in one write, zero runs by the zero policy, compressed clusters one by one.
public enum Copier {
    /// Copies `plan` from `source` into `output` and waits for every write (the caller
    /// flushes or commits the output). The plan's grain is the unit of zero detection and
    /// compression: the output's cluster size.
    @discardableResult
    public static func copy(_ plan: CopyPlan, from source: GuestReader, to output: CopyOutput, options: CopyOptions,
                            progress: ((UInt64, UInt64) -> Void)? = nil) throws -> CopyResult {
        let grain = Int(plan.grain)
        let chunk = max(options.chunkBytes / grain, 1) * grain
        var pool: CompressionPool?
        if options.compress {
            guard case .image(let image) = output, let qcow = image as? QCowFile, qcow.clusterSize == grain else {
                throw QCowError(.invalidArgument, "compression needs a qcow2 output and a plan of its clusters", path: source.name)
            }
            pool = CompressionPool(qcow.header.compression, workers: options.workers)
        }
        defer { pool?.close() }
        let writer = ChunkWriter(output: output, zeros: options.zeros)
        let pipeline = WriteBehind(bufferSize: pool == nil ? chunk : 2 * chunk)
        defer { pipeline.drain() }
        var result = CopyResult()
        try source.willRead(plan.ranges, chunk: chunk, bufferSize: pipeline.bufferSize)
        var done: UInt64 = 0
        for range in plan.ranges {
            var offset = range.lowerBound
            while offset < range.upperBound {
                // Chunks end on multiples of the chunk size, so they split clusters nowhere.
                let boundary = (offset / UInt64(chunk) + 1) * UInt64(chunk)
                let n = Int(min(range.upperBound, boundary) - offset)
                let piece = Chunk(offset: offset, count: n, grain: grain)
                try pipeline.submitExchanging(fill: { buffer in
                    let exchanged = try source.read(exchanging: buffer, count: n, at: offset)
                    piece.findZeros(in: UnsafeRawBufferPointer(rebasing: (exchanged ?? buffer)[0..<n]))
                    return (pool == nil ? n : 2 * chunk, exchanged)
                }, process: pool.map { pool in { buffer in piece.compress(buffer, chunk: chunk, with: pool) } },
                   write: { buffer in try writer.write(piece, from: buffer, chunk: chunk) })
                result.dataBytes += piece.dataBytes
                result.zeroBytes += UInt64(n) - piece.dataBytes
                offset += UInt64(n)
                done += UInt64(n)
                progress?(done, plan.bytes)
            }
        }
        try pipeline.finish()
        result.compressionThreads = pool?.threadsThatCompressed ?? 0
        return result
    }

    /// Whether every byte is zero (a word at a time).
    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        for i in 0..<words where bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        for i in (words * 8)..<bytes.count where bytes[i] != 0 { return false }
        return true
    }
}

/// One chunk on its way through the stages: its clusters (pieces of the grain grid), which
/// read as zeros, and their compressed sizes. Each stage touches it only after the one before.
final class Chunk: @unchecked Sendable {
    let offset: UInt64
    let count: Int
    /// Start (in the chunk) and length of each cluster the chunk covers.
    let pieces: [(start: Int, length: Int)]
    let grain: Int
    var zero: [Bool] = []
    /// Compressed size of each piece, 0 when written plain.
    var sizes: [Int] = []
    private(set) var dataBytes: UInt64 = 0

    init(offset: UInt64, count: Int, grain: Int) {
        self.offset = offset
        self.count = count
        self.grain = grain
        var pieces: [(start: Int, length: Int)] = []
        var start = 0
        while start < count {
            let absolute = offset + UInt64(start)
            let next = Int((absolute / UInt64(grain) + 1) * UInt64(grain) - offset)
            let end = min(count, next)
            pieces.append((start, end - start))
            start = end
        }
        self.pieces = pieces
    }

    func findZeros(in data: UnsafeRawBufferPointer) {
        zero = pieces.map { Copier.isZero(UnsafeRawBufferPointer(rebasing: data[$0.start..<($0.start + $0.length)])) }
        dataBytes = zip(pieces, zero).reduce(0) { $0 + ($1.1 ? 0 : UInt64($1.0.length)) }
    }

    /// Compresses each whole data cluster into the second half of `buffer` (same offset there).
    func compress(_ buffer: UnsafeMutableRawBufferPointer, chunk: Int, with pool: CompressionPool) {
        sizes = [Int](repeating: 0, count: pieces.count)
        let todo = pieces.indices.filter { !zero[$0] && pieces[$0].length == grain }
        guard !todo.isEmpty else { return }
        sizes.withUnsafeMutableBufferPointer { sizes in
            pool.run(CompressionPool.Job(input: UnsafeRawBufferPointer(rebasing: buffer[0..<count]),
                                         output: UnsafeMutableRawBufferPointer(rebasing: buffer[chunk..<(2 * chunk)]),
                                         pieces: pieces, todo: todo, sizes: sizes))
        }
    }
}

/// The writer stage: a chunk's runs into the output, in order.
struct ChunkWriter: @unchecked Sendable {
    let output: CopyOutput
    let zeros: ZeroPolicy

    func write(_ chunk: Chunk, from buffer: UnsafeRawBufferPointer, chunk size: Int) throws {
        let pieces = chunk.pieces
        var i = 0
        while i < pieces.count {
            let start = i
            let at = chunk.offset + UInt64(pieces[start].start)
            func end(_ j: Int) -> Int { j < pieces.count ? pieces[j].start : chunk.count }
            if chunk.zero[i] && zeros != .write {
                while i < pieces.count && chunk.zero[i] { i += 1 }
                if zeros == .hide { try writeZeroes(at: at, length: UInt64(end(i) - pieces[start].start)) }
            } else if i < chunk.sizes.count && chunk.sizes[i] > 0, case .image(let image) = output,
                      let qcow = image as? QCowFile {
                let from = size + pieces[i].start
                try qcow.writePrecompressed(UnsafeRawBufferPointer(rebasing: buffer[from..<(from + chunk.sizes[i])]),
                                            at: at, guestLength: pieces[i].length)
                i += 1
            } else {
                func plain(_ j: Int) -> Bool {
                    (!chunk.zero[j] || zeros == .write) && (j >= chunk.sizes.count || chunk.sizes[j] == 0)
                }
                repeat { i += 1 } while i < pieces.count && plain(i)
                try write(UnsafeRawBufferPointer(rebasing: buffer[pieces[start].start..<end(i)]), at: at)
            }
        }
    }

    private func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        switch output {
        case .image(let image): try image.write(bytes, at: offset)
        case .raw(let device, stream: false): try device.write(bytes, at: offset)
        case .raw(let device, stream: true): try Self.writeAll(device, bytes, at: offset)
        }
    }

    private func writeZeroes(at offset: UInt64, length: UInt64) throws {
        switch output {
        case .image(let image): try image.writeZeroes(at: offset, length: length)
        case .raw:
            // A raw target holds no zero flag: the bytes themselves.
            let zeros = [UInt8](repeating: 0, count: Int(length))
            try zeros.withUnsafeBytes { try write($0, at: offset) }
        }
    }

    /// write(2) until all of `bytes` went out (a pipe takes them in pieces).
    static func writeAll(_ out: FileDevice, _ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(out.descriptor.rawValue, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw QCowError(.io, "write failed: \(String(cString: strerror(errno)))", path: out.name,
                                offset: offset + UInt64(done))
            }
            done += n
        }
    }
}
