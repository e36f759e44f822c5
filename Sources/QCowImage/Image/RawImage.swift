/// A raw disk image: guest offset = file offset. Holes (SEEK_HOLE) read as
/// zeros and are reported as zero, as QEMU's file driver does.
public final class RawImage: GuestImage {
    public let filename: String
    public var formatName: String { "raw" }
    public let device: BlockDevice
    public private(set) var virtualSize: UInt64
    public var backing: GuestImage? { nil }

    public init(device: BlockDevice) throws {
        self.device = device
        filename = device.name
        virtualSize = try device.size()
    }

    public func layerStatus(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent {
        let length = min(maxLength, virtualSize - min(offset, virtualSize))
        guard let file = device as? FileDevice else {
            return LayerExtent(length: length, mapping: .data(host: offset))
        }
        // SEEK_DATA/SEEK_HOLE tell where the file has holes; without support, all is data.
        guard let data = file.nextData(from: offset) else {
            return LayerExtent(length: length, mapping: .zero(host: offset))
        }
        if data > offset {
            return LayerExtent(length: min(length, data - offset), mapping: .zero(host: offset))
        }
        let hole = file.nextHole(from: offset) ?? virtualSize
        return LayerExtent(length: min(length, max(hole, offset + 1) - offset), mapping: .data(host: offset))
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try device.readZeroFilling(into: buffer, at: offset)
    }

    public func close() { (device as? FileDevice)?.close() }
}
