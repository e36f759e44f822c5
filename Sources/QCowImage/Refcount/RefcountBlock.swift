/// Reads and writes the entries of one refcount block in place.
///
/// On disk: one cluster of `cluster_size * 8 / refcount_bits` entries,
/// refcount_bits = 1 << refcount_order (0 to 6). Widths of 8 bits and more
/// are big-endian; sub-byte widths pack several entries into a byte with
/// "bit 0 the least significant bit" — qcow2.rst, "Refcount block entry"
/// (QEMU's get_refcount_ro0..ro2).
public enum RefcountCodec {
    /// The largest refcount an entry of `order` can hold.
    @inline(__always)
    public static func maxValue(order: Int) -> UInt64 {
        order == 6 ? UInt64.max : (UInt64(1) << UInt64(1 << order)) - 1
    }

    /// Entries in one block of `clusterSize` bytes.
    @inline(__always)
    public static func entriesPerBlock(clusterSize: Int, order: Int) -> Int {
        (clusterSize * 8) >> order
    }

    /// The refcount at `index` of the block in `bytes`.
    @inline(__always)
    public static func get(_ bytes: UnsafeRawBufferPointer, order: Int, index: Int) -> UInt64 {
        switch order {
        case 0, 1, 2:
            let perByte = 8 >> order
            let width = 1 << order
            let byte = bytes[index / perByte]
            let shift = (index % perByte) * width
            return UInt64((byte >> UInt8(shift)) & UInt8((1 << width) - 1))
        case 3:
            return UInt64(bytes[index])
        case 4:
            return UInt64(UInt16(bigEndian: bytes.loadUnaligned(fromByteOffset: index * 2, as: UInt16.self)))
        case 5:
            return UInt64(UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: index * 4, as: UInt32.self)))
        default:
            return UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self))
        }
    }

    /// Stores `value` (at most `maxValue(order:)`) at `index`; returns the byte range it touched.
    @inline(__always) @discardableResult
    public static func set(_ bytes: UnsafeMutableRawBufferPointer, order: Int, index: Int, value: UInt64) -> Range<Int> {
        precondition(value <= maxValue(order: order), "refcount \(value) does not fit in \(1 << order) bits")
        switch order {
        case 0, 1, 2:
            let perByte = 8 >> order
            let width = 1 << order
            let at = index / perByte
            let shift = UInt8((index % perByte) * width)
            let mask = UInt8((1 << width) - 1) << shift
            bytes[at] = (bytes[at] & ~mask) | (UInt8(value) << shift)
            return at..<(at + 1)
        case 3:
            bytes[index] = UInt8(value)
            return index..<(index + 1)
        case 4:
            bytes.storeBytes(of: UInt16(value).bigEndian, toByteOffset: index * 2, as: UInt16.self)
            return (index * 2)..<(index * 2 + 2)
        case 5:
            bytes.storeBytes(of: UInt32(value).bigEndian, toByteOffset: index * 4, as: UInt32.self)
            return (index * 4)..<(index * 4 + 4)
        default:
            bytes.storeBytes(of: value.bigEndian, toByteOffset: index * 8, as: UInt64.self)
            return (index * 8)..<(index * 8 + 8)
        }
    }
}

/// One refcount block held in memory, with the byte span changed since it was last written.
final class RefcountBlock {
    /// Where the block lives in the image file.
    let offset: UInt64
    var bytes: [UInt8]
    /// Bytes changed since the last write (empty when clean).
    var dirty: Range<Int>?

    init(offset: UInt64, bytes: [UInt8]) {
        self.offset = offset
        self.bytes = bytes
    }

    func get(order: Int, index: Int) -> UInt64 {
        bytes.withUnsafeBytes { RefcountCodec.get($0, order: order, index: index) }
    }

    func set(order: Int, index: Int, value: UInt64) {
        let touched = bytes.withUnsafeMutableBytes { RefcountCodec.set($0, order: order, index: index, value: value) }
        if let d = dirty {
            dirty = min(d.lowerBound, touched.lowerBound)..<max(d.upperBound, touched.upperBound)
        } else {
            dirty = touched
        }
    }

    func markAllDirty() { dirty = 0..<bytes.count }
}
