/// `qemu-img compare` semantics: guest-visible contents equal? A larger image
/// matches when its extra part reads as zeros.
public enum ImageComparison {
    public enum Outcome: Equatable, Sendable {
        case identical
        /// The first differing byte offset.
        case mismatch(UInt64)
        /// Sizes differ and `strict` was asked for.
        case sizeMismatch(UInt64, UInt64)
    }

    /// Compares two opened images chunk by chunk; ranges zero in both are not read.
    public static func compare(_ a: GuestImage, _ b: GuestImage, strict: Bool = false,
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Outcome {
        if strict && a.virtualSize != b.virtualSize { return .sizeMismatch(a.virtualSize, b.virtualSize) }
        let common = min(a.virtualSize, b.virtualSize)
        let total = max(a.virtualSize, b.virtualSize)
        let chunk = 4 << 20
        var bufA = [UInt8](repeating: 0, count: chunk)
        var bufB = [UInt8](repeating: 0, count: chunk)
        var offset: UInt64 = 0
        while offset < common {
            let sa = try a.blockStatus(at: offset, maxLength: min(UInt64(chunk), common - offset))
            let sb = try b.blockStatus(at: offset, maxLength: sa.length)
            let n = Int(sb.length)
            if sa.kind != .data && sb.kind != .data {
                offset += UInt64(n)
                continue
            }
            try bufA.withUnsafeMutableBytes { try a.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
            try bufB.withUnsafeMutableBytes { try b.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
            if let i = firstDifference(bufA, bufB, count: n) { return .mismatch(offset + UInt64(i)) }
            offset += UInt64(n)
            progress?(offset, total)
        }
        // The tail of the larger image must read as zeros.
        let larger = a.virtualSize > b.virtualSize ? a : b
        while offset < total {
            let s = try larger.blockStatus(at: offset, maxLength: min(UInt64(chunk), total - offset))
            let n = Int(s.length)
            if s.kind == .data {
                try bufA.withUnsafeMutableBytes { try larger.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
                if let i = bufA[0..<n].firstIndex(where: { $0 != 0 }) { return .mismatch(offset + UInt64(i)) }
            }
            offset += UInt64(n)
            progress?(offset, total)
        }
        return .identical
    }

    static func firstDifference(_ a: [UInt8], _ b: [UInt8], count: Int) -> Int? {
        a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                if memcmp(pa.baseAddress!, pb.baseAddress!, count) == 0 { return nil }
                // Narrow down with word compares, then bytes.
                var i = 0
                while i + 4096 <= count, memcmp(pa.baseAddress! + i, pb.baseAddress! + i, 4096) == 0 { i += 4096 }
                while i < count, pa[i] == pb[i] { i += 1 }
                return i
            }
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
