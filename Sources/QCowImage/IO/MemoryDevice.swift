/// A `BlockDevice` in memory, for tests and fuzzing: it logs writes and syncs
/// and can stop (throw `simulatedCrash`) at the Nth one, so a test can
/// enumerate every crash point of an operation.
public final class MemoryDevice: BlockDevice, @unchecked Sendable {
    /// One logged operation.
    public enum Operation: Equatable, Sendable {
        case write(offset: UInt64, bytes: [UInt8])
        case resize(UInt64)
        case sync
    }

    public let name: String
    public private(set) var bytes: [UInt8]
    /// Every write, resize and sync, in order (only while `logging`).
    public private(set) var log: [Operation] = []
    public var logging = false
    /// When set, the operation with this index (0-based, counting writes, resizes and syncs) throws.
    public var failAtOperation: Int?
    private var operationCount = 0

    public init(name: String = "memory", bytes: [UInt8] = []) {
        self.name = name
        self.bytes = bytes
    }

    public func size() throws -> UInt64 { UInt64(bytes.count) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard offset < UInt64(bytes.count) else { return 0 }
        let start = Int(offset)
        let n = min(buffer.count, bytes.count - start)
        bytes.withUnsafeBytes { src in
            buffer.baseAddress!.copyMemory(from: src.baseAddress! + start, byteCount: n)
        }
        return n
    }

    private func step(_ op: @autoclosure () -> Operation) throws {
        if let fail = failAtOperation, operationCount >= fail {
            throw QCowError(.io, "simulated crash at operation \(operationCount)", path: name)
        }
        operationCount += 1
        if logging { log.append(op()) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try step(.write(offset: offset, bytes: Array(buffer)))
        let end = Int(offset) + buffer.count
        if end > bytes.count { bytes.append(contentsOf: repeatElement(0, count: end - bytes.count)) }
        bytes.withUnsafeMutableBytes { dst in
            if buffer.count > 0 { (dst.baseAddress! + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count) }
        }
    }

    public func resize(to size: UInt64) throws {
        try step(.resize(size))
        if Int(size) < bytes.count {
            bytes.removeLast(bytes.count - Int(size))
        } else {
            bytes.append(contentsOf: repeatElement(0, count: Int(size) - bytes.count))
        }
    }

    public func sync() throws { try step(.sync) }

    /// Operations performed so far (including unlogged ones).
    public var operations: Int { operationCount }

    /// The device contents after replaying the first `count` logged operations onto `initial`.
    public static func replay(_ log: [Operation], count: Int, onto initial: [UInt8]) -> [UInt8] {
        var out = initial
        for op in log.prefix(count) {
            switch op {
            case .write(let offset, let data):
                let end = Int(offset) + data.count
                if end > out.count { out.append(contentsOf: repeatElement(0, count: end - out.count)) }
                out.replaceSubrange(Int(offset)..<end, with: data)
            case .resize(let size):
                if Int(size) < out.count { out.removeLast(out.count - Int(size)) } else {
                    out.append(contentsOf: repeatElement(0, count: Int(size) - out.count))
                }
            case .sync:
                break
            }
        }
        return out
    }
}
