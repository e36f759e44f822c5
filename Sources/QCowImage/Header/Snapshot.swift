/// An internal snapshot table entry — qcow2.rst, "Snapshots": 40 fixed bytes,
/// extra data, unique id string, name, padded to 8.
public struct Snapshot: Equatable, Sendable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    /// The unique id and the name as stored: bytes, which need not be valid UTF-8.
    public var idBytes: [UInt8]
    public var nameBytes: [UInt8]
    public var id: String { String(decoding: idBytes, as: UTF8.self) }
    public var name: String { String(decoding: nameBytes, as: UTF8.self) }
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize: UInt32
    /// Extra data, kept as is (vm_state_size_large, disk_size, icount when present).
    public var extraData: [UInt8]

    /// disk_size from the extra data, when the entry has it.
    public var diskSize: UInt64? {
        extraData.count >= 16 ? try? ByteReader(extraData, region: "snapshot extra data").u64(at: 8) : nil
    }
    /// vm_state_size_large from the extra data, else the 32-bit field.
    public var vmStateSizeLarge: UInt64 {
        if extraData.count >= 8, let v = try? ByteReader(extraData, region: "snapshot extra data").u64(at: 0) { return v }
        return UInt64(vmStateSize)
    }
    /// icount from the extra data, when present (QEMU reports -1 as absent).
    public var icount: UInt64? {
        extraData.count >= 24 ? try? ByteReader(extraData, region: "snapshot extra data").u64(at: 16) : nil
    }

    public static let maxExtraData = 1024
    public static let maxTableBytes: UInt64 = 64 << 20

    /// Decodes `count` entries starting at the beginning of `reader`'s bytes.
    public static func decodeTable(_ r: inout ByteReader, count: Int) throws -> [Snapshot] {
        var out: [Snapshot] = []
        out.reserveCapacity(min(count, 1024))
        for _ in 0..<count {
            let start = r.position
            let l1Offset = try r.u64()
            let l1Size = try r.u32()
            let idSize = Int(try r.u16())
            let nameSize = Int(try r.u16())
            let dateSec = try r.u32()
            let dateNsec = try r.u32()
            let vmClock = try r.u64()
            let vmState = try r.u32()
            let extraSize = Int(try r.u32())
            guard extraSize <= maxExtraData else {
                throw r.error(.invalidFormat, "snapshot extra_data_size \(extraSize) exceeds \(maxExtraData)", at: start + 36)
            }
            let extra = try r.bytes(extraSize)
            let id = try r.bytes(idSize)
            let name = try r.bytes(nameSize)
            try r.align(to: 8, allowingEnd: true)
            out.append(Snapshot(l1TableOffset: l1Offset, l1Size: l1Size, idBytes: id, nameBytes: name, dateSeconds: dateSec,
                                dateNanoseconds: dateNsec, vmClockNanoseconds: vmClock, vmStateSize: vmState,
                                extraData: extra))
        }
        return out
    }

    /// Encodes one entry, padded to 8.
    public func encode(into w: inout ByteWriter) {
        let start = w.bytes.count
        w.u64(l1TableOffset)
        w.u32(l1Size)
        w.u16(UInt16(idBytes.count))
        w.u16(UInt16(nameBytes.count))
        w.u32(dateSeconds)
        w.u32(dateNanoseconds)
        w.u64(vmClockNanoseconds)
        w.u32(vmStateSize)
        w.u32(UInt32(extraData.count))
        w.append(extraData)
        w.append(idBytes)
        w.append(nameBytes)
        w.zeros((8 - (w.bytes.count - start) % 8) % 8)
    }
}
